"""Generation on a trained model with multi-token answers: facts-vlm (examples/facts-vlm)
exported with its KV cache, compiled (RTN 4-bit, llvm) and run by the Python runtime.

- The greedy tokens with the cache equal the simulated model's, the whole sequence re-run
  for every token (the `reference_greedy` of test_generate_python.py).
- The generated ``code`` answers (``d d end``) are the invented facts the model memorized;
  ``where`` (``r c end``) and ``list`` (``d … end``) read digits off an image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from modec import data

pytest.importorskip("tvm")

ROOT = Path(__file__).resolve().parents[2]
FACTS = ROOT / "examples" / "facts-vlm"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (FACTS / "model.onnx").exists(), reason="examples/facts-vlm not built"),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modec.driver import CompileOptions, compile_model
    from tools.digits_vlm.export import export_cached, trained_from_onnx
    from tools.facts_vlm import scenes
    from tools.facts_vlm.train import config

    root = tmp_path_factory.mktemp("facts_kv")
    model = trained_from_onnx(FACTS / "model.onnx", config(), scenes)
    export_cached(model, root / "model_kv.onnx", task=scenes, name="facts-vlm")
    for name in ("tokenizer.json", "processor.json"):
        shutil.copyfile(FACTS / name, root / name)
    o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target="llvm",
                       cache_dir=None)  # fmt: skip
    compile_model(root / "model_kv.onnx", FACTS / "calib.npz", root / "out", o)
    return root / "out"


def _rows(ds: data.Dataset, family: str, n: int) -> list[int]:
    """The first ``n`` samples of ``family``; for a knowledge family, of entities in the
    most mentioned quarter of training (the facts the model holds best)."""
    from tools.facts_vlm.build import popularity_quarter

    assert ds.family is not None
    keep = ds.family == ds.families.index(family)
    if family == "code":
        keep &= popularity_quarter(ds) == 0
    return np.flatnonzero(keep)[:n].tolist()


def test_greedy_answers_with_the_cache(compiled: Path) -> None:
    import modec.runtime

    from tests.generation.test_generate_python import reference_greedy
    from tools.facts_vlm import scenes

    ds = data.load(FACTS / "eval.npz")
    session = modec.runtime.load(compiled)
    assert ds.answer is not None
    code_hits = []
    for family in ("code", "where", "list"):
        for i in _rows(ds, family, 6):
            feeds = ds.prompt(i)
            n = int(data.answer_lengths(ds.answer[i : i + 1])[0])
            got = session.generate(feeds, max_new_tokens=n, stop=[scenes.END_ID]).tokens[0]
            assert got == reference_greedy(compiled, feeds, len(got))[0], (family, i)
            if family == "code":
                code_hits.append(got == ds.answer[i, :n].tolist())
    # Memorized facts (fp32 teacher-forced accuracy of `code` by popularity quarter:
    # examples/facts-vlm/README.md).
    assert np.mean(code_hits) >= 5 / 6, code_hits
