"""Neuronpedia links to SAE latents, spelt as the sae_cooccurrence reference writes them in its node tables."""

from __future__ import annotations

import json
import urllib.parse

NEURONPEDIA = "https://neuronpedia.org"  # as the reference writes its links


def neuronpedia_link(neuronpedia_id: str, latent: int) -> str:
    """The Neuronpedia page of ``latent`` of the SAE ``neuronpedia_id`` (e.g. ``"gpt2-small/0-res-jb"``)."""
    return f"{NEURONPEDIA}/{neuronpedia_id}/{latent}"


def quicklist_link(neuronpedia_id: str, latents: list[int], name: str = "temporary_list") -> str:
    """A Neuronpedia quick list of ``latents`` of the SAE ``neuronpedia_id`` (``"{model}/{layer}"``), spelt as the
    reference's ``get_neuronpedia_quick_list_no_open`` spells it (its ``modelId`` is the id's model part)."""
    model, _, layer = neuronpedia_id.partition("/")
    features = [{"modelId": model, "layer": layer, "index": str(latent)} for latent in latents]
    query = f"?name={urllib.parse.quote(name)}&features={urllib.parse.quote(json.dumps(features))}"
    return f"{NEURONPEDIA}/quick-list/{query}"
