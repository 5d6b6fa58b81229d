"""The explorer: a Streamlit app over a results directory (``mechscope app RESULTS_DIR``).

Views: the latent dashboards (:mod:`.latent_view`), the prompt inspector (:mod:`.inspector_view`). The app reads
results lazily through the library's readers and loads the model only for the inspector. Nothing in the library
imports this package.
"""
