"""Generation with a KV cache from the Python runtime (docs/generation.md), on the bundled
trained digits-vlm exported with its cache (`cached_vlm`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modec import data
from modec.errors import BadInputError, ModelError


def prompts(path: Path, rows: list[int]) -> dict[str, np.ndarray]:
    """Rows of a modec data set as one left-padded batch (all-padding columns trimmed)."""
    ds = data.load(path).subset(np.asarray(rows))
    _, feeds = next(ds.batches(len(rows)))
    return dict(feeds)


# Two samples of each kind (eval.npz: text-only and multimodal families).
MIXED = [0, 1, 1300, 1301]


@pytest.fixture(scope="module")
def session(cached_vlm):  # type: ignore[no-untyped-def]
    import modec.runtime

    return modec.runtime.load(cached_vlm["out"])


def reference_greedy(out: Path, feeds: dict[str, np.ndarray], n: int) -> list[list[int]]:
    """Greedy continuation by the simulated model (modec's executor on model.sim.onnx), the
    whole sequence re-run for every token: no cache involved."""
    from modec.runners import SimulatedRunner

    sim = SimulatedRunner(out)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for _ in range(n):
        nxt = sim({**feeds, "input_ids": ids, "attention_mask": mask})[:, -1].argmax(-1)
        for b, t in enumerate(nxt):
            rows[b].append(int(t))
        ids = np.concatenate([ids, nxt[:, None].astype(ids.dtype)], axis=1)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), mask.dtype)], axis=1)
    return rows


def test_manifest_has_a_decode_entry_without_the_image(cached_vlm) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((cached_vlm["out"] / "manifest.json").read_text())
    gen = manifest["sections"]["generation"]
    assert gen["decode"]["entry"] == "decode"
    assert gen["prompt_only"] == ["pixel_values"]
    names = [t["name"] for t in gen["decode"]["inputs"]]
    assert "pixel_values" not in names and names[:2] == ["input_ids", "attention_mask"]
    assert [c["past"] for c in gen["cache"][:2]] == [
        "past_key_values.0.key", "past_key_values.0.value"
    ]  # fmt: skip
    # The cache is updated in place: buffers of a capacity, both attention matmuls of every
    # layer read their first positions (no slice, no concat of the cache in decode).
    assert gen["decode"]["cache_in_place"] is True
    past = [t for t in gen["decode"]["inputs"] if t["name"].startswith("past_key_values.")]
    assert past and all(t["shape"][2] == "capacity" for t in past)
    stats = manifest["sections"]["lowering"]["stats"]
    assert stats["matmul_cache_in_place"] == len(gen["cache"])


def test_decode_entry_equals_main(session, cached_vlm) -> None:  # type: ignore[no-untyped-def]
    """One text step through ``decode`` (no image, the cache in buffers of a larger capacity
    written in place) gives ``main``'s logits and cache."""
    feeds = prompts(cached_vlm["eval"], [0, 1300])
    gen = session.generation
    assert gen.cache_in_place
    empty = {c.past: np.zeros((2, c.heads, 0, c.head_dim), np.float32) for c in gen.cache}
    first = session.run({**feeds, **empty})
    mask = np.concatenate([feeds["attention_mask"], np.ones((2, 1), np.int64)], axis=1)
    step = {"input_ids": np.array([[9], [40]]), "attention_mask": mask}
    step.update({c.past: first[c.present] for c in gen.cache})
    via_main = session.run({**step, "pixel_values": feeds["pixel_values"]})
    p = feeds["input_ids"].shape[1]
    room = {c.past: np.pad(first[c.present], [(0, 0), (0, 0), (0, 3), (0, 0)], constant_values=7)
            for c in gen.cache}  # fmt: skip
    via_decode = session.run({**step, **room}, entry="decode", past_length=p)
    np.testing.assert_allclose(via_decode["logits"], via_main["logits"], rtol=1e-5, atol=1e-5)
    for c in gen.cache:
        buf = via_decode[c.present]
        assert buf.shape[2] == p + 3  # the buffer itself: the new position written at p
        np.testing.assert_allclose(buf[:, :, : p + 1], via_main[c.present], rtol=1e-5, atol=1e-5)
        assert (buf[:, :, p + 1 :] == 7).all()  # untouched past the new position


def test_decode_in_place_checks_past_length(session, cached_vlm) -> None:  # type: ignore[no-untyped-def]
    feeds = prompts(cached_vlm["eval"], [0])
    gen = session.generation
    p = feeds["input_ids"].shape[1]
    mask = np.ones((1, p + 1), np.int64)
    step = {"input_ids": np.array([[9]]), "attention_mask": mask}
    step.update({c.past: np.zeros((1, c.heads, p + 1, c.head_dim), np.float32) for c in gen.cache})
    with pytest.raises(BadInputError, match="pass past_length"):
        session.run(step, entry="decode")
    with pytest.raises(BadInputError, match="do not fit the cache"):
        session.run({**step, "attention_mask": np.ones((1, p + 2), np.int64)}, entry="decode",
                    past_length=p + 1)  # fmt: skip
    with pytest.raises(BadInputError, match="covers"):
        session.run(step, entry="decode", past_length=p - 1)
    with pytest.raises(BadInputError, match="does not"):
        session.run({**feeds, **step}, past_length=p)
    assert session.run(step, entry="decode", past_length=p)["logits"].shape[:2] == (1, 1)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_stop_generation(session, cached_vlm, monkeypatch, temperature) -> None:  # type: ignore[no-untyped-def]
    """A NaN anywhere in a row's logits is a ModelError, not a token, greedy or sampled (the
    pick's argmax lands on the row's first NaN)."""
    feeds = prompts(cached_vlm["eval"], [0, 1300])
    real = session._rt.last_position
    seen: list[int] = []

    def poisoned(t):  # type: ignore[no-untyped-def]
        a = np.array(real(t))
        seen.append(1)
        if len(seen) == 3:
            a[1, 5] = np.nan  # the second row, away from its maximum
        return a

    monkeypatch.setattr(session._rt, "last_position", poisoned)
    with pytest.raises(ModelError, match="NaN logits"):
        session.generate(feeds, max_new_tokens=5, temperature=temperature)
    assert len(seen) == 3


def test_sampling_is_seeded(session, cached_vlm) -> None:  # type: ignore[no-untyped-def]
    feeds = prompts(cached_vlm["eval"], MIXED)
    kw = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 20, "top_p": 0.95}
    a = session.generate(feeds, seed=7, **kw).tokens
    assert a == session.generate(feeds, seed=7, **kw).tokens
    assert a != session.generate(feeds, seed=8, **kw).tokens
    greedy = session.generate(feeds, max_new_tokens=8).tokens
    assert session.generate(feeds, max_new_tokens=8, temperature=1.0, top_k=1).tokens == greedy


def test_stop_tokens_callback_and_zero_tokens(session, cached_vlm) -> None:  # type: ignore[no-untyped-def]
    feeds = prompts(cached_vlm["eval"], MIXED)
    full = session.generate(feeds, max_new_tokens=6).tokens
    stop = full[0][1]  # row 0 stops at its second token, the others go on unless they meet it
    got = session.generate(feeds, max_new_tokens=6, stop=[stop]).tokens
    for row, ref in zip(got, full, strict=True):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]
    seen: list[tuple[int, list[int], list[bool]]] = []

    def cb(step: int, tokens: np.ndarray, finished: np.ndarray) -> bool:
        seen.append((step, tokens.tolist(), finished.tolist()))
        return step >= 2  # stop after the third token

    short = session.generate(feeds, max_new_tokens=6, callback=cb)
    assert [s[0] for s in seen] == [0, 1, 2] and all(len(t) == 3 for t in short.tokens)
    assert seen[1][1] == [r[1] for r in full]
    none = session.generate(feeds, max_new_tokens=0)
    assert none.tokens == [[], [], [], []] and none.steps == 0


def test_bad_generation_input(session, cached_vlm) -> None:  # type: ignore[no-untyped-def]
    feeds = prompts(cached_vlm["eval"], [0])
    with pytest.raises(BadInputError, match="top_p"):
        session.generate(feeds, top_p=0.0)
    with pytest.raises(BadInputError, match="max_new_tokens"):
        session.generate(feeds, max_new_tokens=-1)
    gen = session.generation
    with pytest.raises(BadInputError, match="KV cache"):
        session.generate({**feeds, gen.cache[0].past: np.zeros((1, 4, 0, 32), np.float32)})
    empty = {c.past: np.zeros((1, c.heads, 0, c.head_dim), np.float32) for c in gen.cache}
    session.run({**feeds, **empty})  # an empty cache is accepted...
    with pytest.raises(BadInputError, match="empty"):  # ...an empty dim elsewhere is not
        session.run({**feeds, **empty, "input_ids": feeds["input_ids"][:, :0]})
    with pytest.raises(BadInputError, match="entry"):
        session.run(feeds, entry="nope")


def test_artifact_without_cache_refuses(tmp_path: Path) -> None:
    import modec.runtime

    from modec.lowering.build import build_artifact
    from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder

    build_artifact(build_tiny_decoder(TinyConfig()), tmp_path / "a")
    s = modec.runtime.load(tmp_path / "a")
    assert s.generation is None
    with pytest.raises(ModelError, match="no KV cache"):
        s.generate({s.inputs[0].name: np.zeros((1, 4), np.int64)})


def test_splitmix64_reference_values() -> None:
    from modec.runtime._generation import SplitMix64

    r = SplitMix64(0)  # the reference implementation's outputs (Vigna, splitmix64.c)
    assert [r.next_u64() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert SplitMix64(1234567).next_u64() == 6457827717110365317


def test_pick_orders_truncates_and_breaks_ties() -> None:
    from modec.runtime._generation import Settings, SplitMix64, pick

    logits = np.array([1.0, 3.0, 3.0, 2.0, -1.0], np.float32)
    assert pick(logits, Settings(), SplitMix64(0)) == 1  # greedy: lowest id of equal maxima
    rng = SplitMix64(5)
    draws = {pick(logits, Settings(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {1, 2}
    draws = {pick(logits, Settings(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert draws == {1, 2}  # 1 and 2 each hold ~0.42 of the mass: both needed to reach 0.5
    draws = {pick(logits, Settings(temperature=1.0, top_p=0.3), rng) for _ in range(200)}
    assert draws == {1}
