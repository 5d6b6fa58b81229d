"""SAE latent co-occurrence: exact counts, Jaccard, thresholded graphs and their subgraphs."""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports

if TYPE_CHECKING:
    from mechscope.cooccurrence.config import (
        AnalysisConfig,
        ConfigError,
        CoocConfig,
        CountingConfig,
        GenerationConfig,
        PCAConfig,
    )
    from mechscope.cooccurrence.counting import (
        CooccurrenceCounter,
        CooccurrenceCounts,
        count_cooccurrences,
        decoder_norms,
        fold_decoder_norms,
        jaccard,
    )
    from mechscope.cooccurrence.graph import (
        EdgeThreshold,
        GraphResults,
        Subgraph,
        components,
        edge_threshold,
        graph_metrics,
        graph_results,
        largest_component_size,
        node_table,
        subgraphs,
        summary,
        top_cooccurring,
    )
    from mechscope.cooccurrence.layout import file_name, load_partners, load_pca_results, matrix_path, pca_results_path
    from mechscope.cooccurrence.links import neuronpedia_link, quicklist_link
    from mechscope.cooccurrence.outputs import (
        load_counts,
        load_jaccard,
        load_matrix,
        save_counts,
        save_edge_thresholds,
        save_graphs,
        save_matrix,
        save_partners,
        save_pca_results,
        size_histogram,
        write_node_table,
    )
    from mechscope.cooccurrence.pca_results import PCAResults, context_strings, subgraph_pca_results
    from mechscope.cooccurrence.pipeline import run_all, run_count, run_graphs, run_pca
    from mechscope.cooccurrence.records import Partners, SubgraphPCAResult, SubspacePCA
    from mechscope.cooccurrence.subspace import pca_candidates, subgraph_pca, subgraph_pcas
    from mechscope.sae.tokens import LatentTokens, latent_tokens
else:
    __getattr__, __dir__ = lazy_exports(__name__)

__all__ = [
    "AnalysisConfig",
    "ConfigError",
    "CoocConfig",
    "CooccurrenceCounter",
    "CooccurrenceCounts",
    "CountingConfig",
    "EdgeThreshold",
    "GenerationConfig",
    "GraphResults",
    "LatentTokens",
    "PCAConfig",
    "PCAResults",
    "Partners",
    "Subgraph",
    "SubgraphPCAResult",
    "SubspacePCA",
    "components",
    "context_strings",
    "count_cooccurrences",
    "decoder_norms",
    "edge_threshold",
    "file_name",
    "fold_decoder_norms",
    "graph_metrics",
    "graph_results",
    "jaccard",
    "largest_component_size",
    "latent_tokens",
    "load_counts",
    "load_jaccard",
    "load_matrix",
    "load_partners",
    "load_pca_results",
    "matrix_path",
    "neuronpedia_link",
    "node_table",
    "pca_candidates",
    "pca_results_path",
    "quicklist_link",
    "run_all",
    "run_count",
    "run_graphs",
    "run_pca",
    "save_counts",
    "save_edge_thresholds",
    "save_graphs",
    "save_matrix",
    "save_partners",
    "save_pca_results",
    "size_histogram",
    "subgraph_pca",
    "subgraph_pca_results",
    "subgraph_pcas",
    "subgraphs",
    "summary",
    "top_cooccurring",
    "write_node_table",
]
