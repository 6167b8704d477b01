"""The LM's CPU forms (moshi_grpc/models/cpu_fast.py) compute what the plain model computes.

Golden check on the committed fixture (tests/fixtures/lm: the reference's greedy tokens):
the prepared model gives the reference's tokens, and a sampled session gives the plain
model's tokens, bit for bit. The forms change kernels, never the model's names or results.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES

from moshi_grpc.models import lm as lm_module
from moshi_grpc.models.cpu_fast import LMForms, prepare_lm_for_cpu
from moshi_grpc.models.lm import Attention, Linear, load_lm
from moshi_grpc.models.lm_gen import LMGen, SamplingConfig

LM_DIR = FIXTURES / "lm"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(dtype: torch.dtype = torch.float32):
    return load_lm(LM_DIR / "model.safetensors", LM_DIR / "config.json", dtype=dtype)


def _run(lm, codes: torch.Tensor, sampling: SamplingConfig, seed: int) -> list:
    """(ready, text, audio, sampled text, sampled audio) of one session, step by step, in a
    2-row generator (so batched matmuls run too) whose other row runs a sampled session."""
    gen = LMGen(lm, 2)
    gen.reset(0, sampling, seed=seed)
    gen.reset(1, SamplingConfig(), seed=seed + 1)
    out = []
    for t in range(codes.shape[0]):
        r = gen.step(codes[t][None].repeat(2, 1))
        out.append(
            (
                bool(r.ready[0]),
                int(r.text[0]),
                r.audio[0].tolist(),
                int(r.sampled_text[0]),
                r.sampled_audio[0].tolist(),
            )
        )
    return out


def test_packed_linear_swaps_every_matmul_and_keeps_the_weights() -> None:
    plain, fast = _load(), _load()
    names = list(fast.state_dict())
    forms = prepare_lm_for_cpu(fast, "packed-linear")
    if not forms.packed_linear:
        pytest.skip("this torch build has no oneDNN packed linear")
    # swapped for real: every matmul seam computes by a form, the weights and names stay
    linears = [m for m in fast.modules() if isinstance(m, Linear)]
    attns = [m for m in fast.modules() if isinstance(m, Attention)]
    assert linears and all("forward" in m.__dict__ for m in linears)
    assert attns and all({"project_in", "project_out"} <= set(m.__dict__) for m in attns)
    assert list(fast.state_dict()) == names
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values())
    )


@pytest.mark.parametrize("mode", ["on", "attend-columns"])
def test_forms_give_the_reference_tokens_and_the_plain_models(lm_golden, mode: str) -> None:
    """Whatever this torch build offers ("on" without oneDNN is the other forms): the
    reference's greedy tokens, and the plain model's tokens greedy and sampled."""
    codes = lm_golden["codes"]
    plain, fast = _load(), _load()
    forms = prepare_lm_for_cpu(fast, mode)
    assert forms.attend_columns
    assert not forms.kv_f32_f16  # a float32 model keeps its cache dtype

    greedy = _run(fast, codes, SamplingConfig.greedy(), seed=0)
    for t, (ready, text, audio, _, _) in enumerate(greedy):
        frame = (text, audio) if ready else None
        expected = (
            None if lm_golden["text"][t] is None else (lm_golden["text"][t], lm_golden["audio"][t])
        )
        assert frame == expected, f"step {t}"
    assert greedy == _run(plain, codes, SamplingConfig.greedy(), seed=0)
    sampled = SamplingConfig(0.8, 10, 0.9, 20)
    assert _run(fast, codes, sampled, seed=3) == _run(plain, codes, sampled, seed=3)


def test_prefill_with_forms_equals_plain() -> None:
    """The replay path (multi-row matmuls through the packed projections) fills the same
    cache as the plain model's, to float rounding, and continues with the same tokens."""
    plain, fast = _load(), _load()
    prepare_lm_for_cpu(fast, "on")
    cfg = plain.config
    g = torch.Generator().manual_seed(0)
    total = 3 * cfg.context
    user = torch.randint(0, cfg.card, (total, cfg.num_user_streams), generator=g)
    text = torch.randint(0, cfg.text_card, (total,), generator=g)
    audio = torch.randint(0, cfg.card, (total, cfg.dep_q), generator=g)
    gens = []
    for lm in (plain, fast):
        gen = LMGen(lm, 1)
        gen.reset(0, SamplingConfig.greedy(), seed=0)
        gen.prefill(0, user, text, audio, chunk=4)
        gens.append(gen)
    for a, b in zip(gens[0].cache.k + gens[0].cache.v, gens[1].cache.k + gens[1].cache.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for t in range(6):
        r = [gen.step(user[t][None]) for gen in gens]
        assert r[0].text.tolist() == r[1].text.tolist()
        assert r[0].audio.tolist() == r[1].audio.tolist()


def test_half_precision_forms_stay_close_to_plain() -> None:
    """bfloat16 with every form (packed bf16 matmuls, float32 keys / float16 values): the
    cache takes the split dtypes and one step's logits stay within bf16 rounding of the
    plain bf16 model's (the two round differently, so tokens are not compared)."""
    plain, fast = _load(torch.bfloat16), _load(torch.bfloat16)
    forms = prepare_lm_for_cpu(fast, "on")
    assert forms.kv_f32_f16
    gen = LMGen(fast, 1)
    assert (gen.cache.key_dtype, gen.cache.value_dtype) == (torch.float32, torch.float16)
    tokens = torch.tensor([[5] + [3] * 16])
    steps = torch.tensor([0])
    logits = []
    for lm in (plain, fast):
        with torch.inference_mode():
            cache = lm.new_kv_cache(1)
            hidden, text_logits = lm.temporal_step(tokens, cache, lm.plan_step(steps, 1, False))
            scratch = lm.new_depformer_scratch(1).views(1)
            dep = lm.depformer_step(0, hidden, torch.tensor([7]), scratch[0])
        logits.append(torch.cat([text_logits.float(), dep.float()], -1))
    assert (logits[0] - logits[1]).abs().max() <= 0.05 * logits[0].abs().max()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16)])
def test_column_attention_is_the_same_function(dtypes) -> None:
    """`attend_ring_columns` (matrix-vector products) computes `lm.attend_ring` (row-vector
    products) to float rounding, hidden keys included; "on" installs it in every layer."""
    from moshi_grpc.models.cpu_fast import attend_ring_columns

    kd, vd = dtypes
    g = torch.Generator().manual_seed(0)
    b, h, length, d = 3, 2, 37, 16
    q = torch.randn(b, h, 1, d, generator=g).to(kd)
    keys = torch.randn(b, h, length, d, generator=g).to(kd)
    values_t = torch.randn(b, h, d, length, generator=g).to(vd)
    mask = torch.rand(b, 1, 1, length, generator=g) < 0.6
    mask[..., 0] = True  # every row sees at least one key
    for m in (None, mask):
        rows = lm_module.attend_ring(q, keys, values_t, m)
        cols = attend_ring_columns(q, keys, values_t, m)
        assert rows.shape == cols.shape == (b, h, 1, d)
        torch.testing.assert_close(cols.float(), rows.float(), rtol=2e-3, atol=2e-3)
    # a hidden key does not count: changing it leaves the output alone
    hidden = (~mask[0, 0, 0]).nonzero()[0, 0]
    moved = keys.clone()
    moved[0, :, hidden] += 100
    torch.testing.assert_close(
        attend_ring_columns(q, moved, values_t, mask), attend_ring_columns(q, keys, values_t, mask)
    )
    lm = _load()
    forms = prepare_lm_for_cpu(lm, "on")
    assert forms.attend_columns
    assert all(layer.attend is attend_ring_columns for layer in lm.transformer.layers)


def test_packed_form_takes_over_from_min_rows() -> None:
    """Below `packed_from_rows` input rows the plain `F.linear` runs (bit for bit); from
    there the packed kernel, same function to float rounding."""
    lm = _load()
    forms = prepare_lm_for_cpu(lm, LMForms(packed_linear=True, packed_from_rows=4))
    if not forms.packed_linear:
        pytest.skip("this torch build has no oneDNN packed linear")
    assert str(forms).startswith("packed-linear on (from 4 rows), attend-columns off")
    lin = lm.transformer.layers[0].gating.linear_in
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 3, 4, 9):
            x = torch.randn(rows, lin.in_features, generator=g)
            out, plain = lin(x), torch.nn.functional.linear(x, lin.weight)
            if rows < 4:
                assert torch.equal(out, plain)
            torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        x = torch.randn(2, 3, lin.in_features, generator=g)  # leading dims count as rows
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight))


def test_modes_and_devices(lm_golden) -> None:
    lm = _load()
    assert prepare_lm_for_cpu(lm, "off") == LMForms()
    assert not any(s in m.__dict__ for m in lm.modules() for s in _seams(m))  # untouched
    with pytest.raises(ValueError, match="unknown LM CPU forms"):
        prepare_lm_for_cpu(lm, "fast")
    with pytest.raises(ValueError, match="unknown LM CPU forms"):
        LMForms.parse("packed-linear,turbo")
    with pytest.raises(ValueError, match="unknown LM CPU forms"):
        LMForms.parse(",")  # say so rather than run the plain model unasked
    assert LMForms.parse("attend-columns, kv-f32-f16") == LMForms(
        attend_columns=True, kv_f32_f16=True
    )
    assert LMForms.parse("on") == "on" and LMForms.parse("auto") == "auto"
    named = _load()
    assert prepare_lm_for_cpu(named, "attend-columns") == LMForms(attend_columns=True)
    assert not any("forward" in m.__dict__ for m in named.modules())  # not packed
    forms = prepare_lm_for_cpu(lm, "auto")  # whatever it measures here...
    assert forms == forms & prepare_lm_for_cpu(_load(), "on")  # ...among what applies...
    codes = lm_golden["codes"][:12]
    sampled = SamplingConfig(0.8, 10, 0.9, 20)  # ...the tokens stay the plain model's
    assert _run(lm, codes, sampled, seed=1) == _run(_load(), codes, sampled, seed=1)
    # "off" after "on" gives the plain model back, seam by seam
    prepare_lm_for_cpu(lm, "on")
    assert prepare_lm_for_cpu(lm, "off") == LMForms()
    assert not any(s in m.__dict__ for m in lm.modules() for s in _seams(m))
    with torch.device("meta"):
        meta = lm_module.LMModel(lm.config)
    assert prepare_lm_for_cpu(meta, "on") == LMForms()  # not a CPU model


def _seams(module: torch.nn.Module) -> tuple[str, ...]:
    return getattr(type(module), "device_seams", ())


def test_model_file_does_not_import_the_cpu_forms() -> None:
    """Speed is applied from above: lm.py and lm_gen.py never import cpu_fast."""
    import ast

    from moshi_grpc.models import lm_gen

    for module in (lm_module, lm_gen):
        tree = ast.parse(open(module.__file__).read())
        imported = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.append(node.module or "")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported += [alias.name for alias in node.names]
        assert not any("cpu_fast" in (name or "") for name in imported), module.__name__


def test_cpu_forms_reach_the_models_through_public_seams_only() -> None:
    """cpu_fast.py imports only public names of the model files and touches no private
    attribute but its own; every seam it replaces is declared by the model (`_replace`
    refuses others)."""
    import ast

    from moshi_grpc.models import cpu_fast, mimi

    tree = ast.parse(open(cpu_fast.__file__).read())
    imported = [
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("moshi_grpc.models")
        for a in n.names
    ]
    assert imported and not [n for n in imported if n.startswith("_")]
    own = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)} | {
        t.attr
        for n in ast.walk(tree)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }

    def root(node: ast.expr) -> str:
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else ""

    private = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and n.attr.startswith("_")
        and not n.attr.endswith("__")
        and root(n) != "torch"  # torch's own ops (torch.ops.mkldnn._linear_pointwise)
    }
    assert private <= own, private - own
    for model in (mimi, lm_module):
        for name in dir(model):
            seams = getattr(getattr(model, name), "device_seams", ())
            assert all(not s.startswith("_") for s in seams)
    with pytest.raises(AttributeError, match="not a device seam"):
        cpu_fast._replace(_load(), "embed", lambda *a: None)
