"""How much the BOS position weighs in an SAE's evaluation: run after ``bash run.sh demo``.

python examples/sae_special_tokens.py [OUT_DIR]     # default demo_output; about a minute on two CPU cores

Prints the residual-stream norm at BOS against the other positions of the main job's held-out tokens, and the
SAE's figures with special tokens left out (``evaluate_sae``'s default) and with every position judged and spliced.
"""

import json
import sys
from pathlib import Path

from mechscope import HookedModel
from mechscope.apps.main_job import MainJobConfig, held_out_tokens
from mechscope.sae import SparseAutoencoder, evaluate_sae

job = MainJobConfig(out_dir=sys.argv[1] if len(sys.argv) > 1 else "demo_output")
model = HookedModel.from_pretrained(job.model)
sae = SparseAutoencoder.load(Path(job.out_dir) / "sae_training" / "sae")
tokens = held_out_tokens(model, job)
_, cache = model.run_with_cache(tokens, names_filter=job.hook_name)
sq_norm = cache[job.hook_name].pow(2).sum(-1)
bos = tokens == model.tokenizer.bos_token_id
ratio = float((sq_norm[bos].mean() / sq_norm[~bos].mean()).sqrt())
print(f"{int(bos.sum())} BOS positions; RMS norm at BOS / elsewhere: {ratio:.1f}")
for exclude in (True, False):
    figures = evaluate_sae(model, sae, tokens=tokens, exclude_special=exclude, progress=False).to_dict()
    print(
        f"exclude_special={exclude}:",
        json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}),
    )
