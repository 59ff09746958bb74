"""Accelerator targets: a training step compiled by the real TPU and GPU compilers on this
CPU-only host (`crma_jax.targets`, `plan_for_target`, `crma bench memory --target`).

libtpu and the CUDA plugin come with the test install (`crma-jax[aot]`), so these run in CI;
nothing here needs a TPU or a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crma_jax import memory_plan, targets
from crma_jax.config import ModelConfig
from crma_jax.memory_plan import abstract_base, plan_for_target
from crma_jax.model import Decoder
from crma_jax.quant import dequantize_nf4, quantize_nf4
from crma_jax.train.bench import memory as bench_memory
from crma_jax.train.bench.util import cpu_model
from crma_jax.train.cli import main

targets.prepare_host()  # conftest already pins the CPU backend; libtpu must not look for a TPU VM

# Tile-friendly sizes (multiples of 128), so a TPU's (8, 128) tiling pads nothing but the adapters.
SMALL = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
CONFIG = ModelConfig.from_hf(SMALL)


@pytest.fixture(scope="module")
def devices():
    return {name: targets.target_devices(targets.resolve_target(name)) for name in ("v5e-4", "v4-8", "h100", "h100x8")}


def plan(name, devices, config=CONFIG, **kw):
    options = dict(remat="full", seq_len=256, batch_size=4, quant="nf4", attention="blockwise")
    return plan_for_target(config, targets.resolve_target(name), devices=devices[name], **{**options, **kw})


def test_every_target_is_a_topology_its_compiler_accepts():
    for name, target in targets.TARGETS.items():
        devices = targets.target_devices(target)
        assert len(devices) == target.chips, name
        assert {d.platform for d in devices} == {target.platform}, name
    assert targets.target_devices(targets.resolve_target("v5e-16"))[0].device_kind == "TPU v5 lite"
    assert "H100" in targets.target_devices(targets.resolve_target("h100"))[0].device_kind
    with pytest.raises(ValueError, match="unknown --target 'v9-8'.*v5e-1"):
        targets.resolve_target("v9-8")


def test_a_gpu_target_can_use_only_the_memory_jax_preallocates(monkeypatch):
    h100 = targets.resolve_target("h100")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert h100.usable_bytes() == int(0.75 * h100.chip.hbm_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert h100.usable_bytes() == int(0.9 * h100.chip.hbm_bytes)
    assert targets.resolve_target("v5e-1").usable_bytes() == targets.CHIPS["v5e"].hbm_bytes


def _argument_bytes(model, platform, mesh_chips, batch_size, seq_len):
    """What one chip must hold as arguments if FSDP splits the base `mesh_chips` ways (each leaf's
    shard, as the sharding rules give it) and replicates adapters and optimizer state."""
    from crma_jax.adapters import init_adapters, param_labels
    from crma_jax.optim import make_optimizer
    from crma_jax.sharding import make_mesh, param_shardings

    frozen = abstract_base(model, jnp.bfloat16, "nf4", platform)
    mesh = make_mesh((1, mesh_chips, 1), jax.devices("cpu")[:mesh_chips])
    shards = jax.tree.leaves(param_shardings(frozen, mesh))
    base = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(jax.tree.leaves(frozen), shards))
    trainable = jax.eval_shape(lambda p: init_adapters(model, p, jax.random.PRNGKey(0)), frozen)
    opt = make_optimizer(param_labels(trainable), dict.fromkeys(("lora_a", "lora_b", "crma_read_mix", "crma_gate"), 1e-3),
                         total_steps=10)
    replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((trainable, jax.eval_shape(opt.init, trainable))))
    batch = 4 * (batch_size // mesh_chips) * seq_len * 4  # four int32 (B, T) arrays, split over fsdp
    return base + replicated + batch + 8  # + the rng key


def test_per_chip_arguments_are_the_shards_of_base_adapters_and_optimizer(devices):
    model = Decoder(CONFIG, lora_config=memory_plan.LoraConfig(rank=8), crma_config=memory_plan.CRMAConfig(rank=4))
    one = plan("h100", devices)
    eight = plan("h100x8", devices, batch_size=8)
    assert one.mesh_shape == (1, 1, 1) and eight.mesh_shape == (1, 8, 1)
    # GPU buffers are unpadded: the compiler's argument bytes are the analytic shards, less a few
    # scalars of optimizer state that the step never reads (jit drops unused arguments).
    assert one.plan.argument == pytest.approx(_argument_bytes(model, "gpu", 1, 4, 256), abs=64)
    assert eight.plan.argument == pytest.approx(_argument_bytes(model, "gpu", 8, 8, 256), abs=64)
    assert eight.plan.weights < one.plan.weights / 6  # FSDP really splits the base
    # A TPU pads small minor dimensions to its (8, 128) tiles (LoRA's r=8 columns): at least the
    # shards, and the split shows the same way.
    four = plan("v5e-4", devices)
    expected = _argument_bytes(model, "tpu", 4, 4, 256)
    assert expected - 64 <= four.plan.argument < 2 * expected
    assert four.plan.weights < one.plan.weights / 3


@pytest.mark.parametrize("name", ["v5e-4", "h100"])
def test_nf4_and_blockwise_attention_lower_and_remat_orders_memory(name, devices):
    # Long enough rows, and enough layers, that saved activations, not the loss head or one
    # layer's recomputation, dominate the temporaries. (At 2 or 4 layers libtpu's plan without
    # remat is already as small as with it: one row per chip.)
    deep = dataclasses.replace(CONFIG, num_layers=8)
    full = plan(name, devices, deep, remat="full", seq_len=2048)
    none = plan(name, devices, deep, remat="none", seq_len=2048)
    assert full.plan.temp < 0.7 * none.plan.temp, (full.plan, none.plan)
    assert full.fits and full.policy == "full" and full.error is None
    bf16 = plan(name, devices, deep, remat="full", seq_len=2048, quant=None)
    # The kernels reach the device as 4-bit codes. A GPU stores them unpadded; a TPU pads the
    # stacked (layers, codes) arrays to its 32-row uint8 tiles.
    assert full.plan.argument < bf16.plan.argument
    if name == "h100":
        assert bf16.plan.argument - full.plan.argument >= 0.9 * (bf16.plan.weights - full.plan.weights)


def test_nf4_dequantization_on_a_tpu_reads_and_writes_about_the_kernel_once(devices):
    # A TPU pads a 1-D array or a (..., 2) nibble pair to its (8, 128) tiles: dequantizing the
    # flattened codes accessed 438x the bytes of the bf16 kernel it writes, stacking looked-up
    # nibble pairs 32x, repeating each byte in place 14x (libtpu as pinned by the aot extra).
    chip = jax.sharding.Mesh(np.array(devices["v5e-4"][:1]), ("x",))
    one = jax.sharding.NamedSharding(chip, jax.sharding.PartitionSpec())
    shape = (512, 2048)
    q = jax.eval_shape(quantize_nf4, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    q = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), q)
    compiled = jax.jit(lambda q: dequantize_nf4(q, jnp.bfloat16)).lower(q).compile()
    written = math.prod(shape) * jnp.dtype(jnp.bfloat16).itemsize
    assert compiled.cost_analysis()["bytes accessed"] < 16 * written


def test_a_v4_megacore_slice_compiles_one_device_per_chip(devices):
    result = plan("v4-8", devices)
    assert len(devices["v4-8"]) == 4 and result.mesh_shape == (1, 4, 1)
    assert result.fits and result.plan.weights < result.plan.argument


def test_a_step_that_does_not_fit_is_reported_and_auto_ends_at_the_leanest():
    # The ladder is the same whatever compiles the policies: here XLA:CPU, which compiles the six
    # of them in seconds (the GPU and TPU compilers are exercised by the tests above).
    cpu = jax.devices("cpu")[:1]
    tiny = dataclasses.replace(targets.resolve_target("h100"), chip=dataclasses.replace(
        targets.CHIPS["h100"], hbm_bytes=2**20))
    result = plan_for_target(CONFIG, tiny, remat="auto", devices=cpu, seq_len=256, batch_size=4)
    assert not result.fits
    assert result.policy == "full" and list(result.needed) == list(memory_plan.REMAT_BY_SPEED)
    assert all(n is not None and n > 0 for n in result.needed.values())
    roomy = plan_for_target(CONFIG, targets.resolve_target("h100"), remat="auto", devices=cpu, seq_len=256, batch_size=4)
    assert roomy.fits and roomy.policy == "none" and list(roomy.needed) == ["none"]


def test_a_compiler_that_refuses_the_program_for_memory_is_a_plan_that_does_not_fit(monkeypatch, devices):
    def refuse(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                           "temporaries (19.54G) exceeds available HBM (15.75G).\nmore lines")

    monkeypatch.setattr(memory_plan, "compile_step_from_shapes", refuse)
    result = plan("v5e-4", devices, remat="auto")
    assert not result.fits and result.plan is None
    assert result.needed == dict.fromkeys(memory_plan.REMAT_BY_SPEED)
    assert result.error.startswith("RESOURCE_EXHAUSTED") and "\n" not in result.error

    def other(*args, **kwargs):
        raise RuntimeError("INVALID_ARGUMENT: something else")

    monkeypatch.setattr(memory_plan, "compile_step_from_shapes", other)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan("v5e-4", devices)


def test_bench_memory_target_rows_and_errors_before_output(tmp_path, capsys, devices):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL))
    assert main(["bench", "memory", "--arch", str(path), "--target", "h100", "--seq-len", "256", "--batch-size", "2",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["target"] == "h100" and rows[0]["fits"] is True
    assert rows[0]["remat"] == "auto -> none" and rows[0]["total"] > 0
    # The roofline: the deviceless GPU compiler counts nothing, so XLA:CPU counts the chip's share.
    row = rows[0]
    assert row["counted by"] == "XLA:CPU" and row["TFLOP/chip"] > 0 and row["GB/chip"] == "-"
    assert row["bound by"] == "compute (bytes not counted)"
    assert row["step ≥ ms"] == pytest.approx(row["TFLOP/chip"] * 1e12 / targets.CHIPS["h100"].peak_bf16_flops * 1e3)
    assert main(["bench", "memory", "--arch", str(path), "--target", "h100", "--seq-len", "256", "--batch-size", "2",
                 "--json", "--no-roofline"]) == 0
    assert "MFU ≤" not in json.loads(capsys.readouterr().out)
    assert main(["bench", "memory", "--arch", str(path), "--target", "v9-8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "unknown --target 'v9-8'" in captured.err
    assert main(["bench", "memory", "--arch", str(path), "--backend", "gpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--backend gpu: not present" in captured.err


def test_bench_memory_grid_resumes_from_its_file_with_the_cpu_plan_beside(tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL))
    grid = tmp_path / "grid.jsonl"
    argv = ["bench", "memory", "--arch", str(path), "--target", "h100", "--per-chip-batch", "2", "--no-roofline",
            "--cpu-beside", "--append", str(grid), "--json", "--seq-len"]
    assert main([*argv, "128"]) == 0
    (first,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (first["T"], first["B"]) == (128, 2) and first["CPU GiB"] > 0 and first["total"] > 0
    assert first["compiled on"] == cpu_model()
    (line,) = grid.read_text().splitlines()
    assert json.loads(line)["row"] == first
    # The row was compiled on another machine: read back, it still says so.
    first["compiled on"] = "Another CPU"
    line = json.dumps({"key": json.loads(line)["key"], "row": first})
    # A stop cut the next row as it was written: it is dropped and compiled again; the first row is
    # read back, not compiled.
    grid.write_text(line + "\n" + line[:40])
    compiled, cpu_compiled = [], []
    real, real_cpu = memory_plan.plan_for_target, bench_memory.plan_step_memory
    monkeypatch.setattr(memory_plan, "plan_for_target", lambda *a, **k: compiled.append(k["seq_len"]) or real(*a, **k))
    monkeypatch.setattr(bench_memory, "plan_step_memory", lambda *a, **k: cpu_compiled.append(k["seq_len"]) or real_cpu(*a, **k))
    argv[argv.index("h100")] = "h100,a10g"  # one chip each, the same policy: XLA:CPU plans each T once
    assert main([*argv, "128,256"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["target"], r["T"], r["B"]) for r in rows] == [("h100", 128, 2), ("h100", 256, 2), ("a10g", 128, 2),
                                                             ("a10g", 256, 2)]
    assert compiled == [256, 128, 256] and cpu_compiled == [256] and rows[0] == first
    assert [r["compiled on"] for r in rows] == ["Another CPU", cpu_model(), cpu_model(), cpu_model()]
    assert rows[2]["remat"] == first["remat"] and rows[2]["CPU GiB"] == first["CPU GiB"]
    assert [json.loads(line)["row"] for line in grid.read_text().splitlines()] == rows
    # --columns: the recorded rows, read back (nothing compiled), in the columns asked for.
    compiled.clear()
    table = [a for a in argv if a != "--json"]
    assert main([*table, "128,256", "--columns", "target,T,CPU GiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert compiled == [] and lines[-6:-4] == ["| target | T | CPU GiB |", "|---|---|---|"]
    assert lines[-4:] == [f"| {r['target']} | {r['T']} | {r['CPU GiB']:.2f} |" for r in rows]
    assert main([*table, "128", "--columns", "target,MFU ≤"]) == 2  # --no-roofline: no such column
    captured = capsys.readouterr()
    assert captured.out == "" and "--columns: no column 'MFU ≤' in this table" in captured.err
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    assert main([*argv[:-4], "--append", str(other), "--seq-len", "128"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"--append {other}: line 1 is not a row this command wrote" in captured.err
    assert other.read_text() == "my notes\n"
    other.write_text("my notes")  # a last line without its newline is cut only when it begins as a row
    assert main([*argv[:-4], "--append", str(other), "--seq-len", "128"]) == 2
    assert f"--append {other}: line 1 is not a row" in capsys.readouterr().err and other.read_text() == "my notes"
    assert main([*argv[:-4], "--append", str(tmp_path / "no" / "grid.jsonl"), "--seq-len", "128"]) == 2
    assert f"no directory {tmp_path / 'no'}" in capsys.readouterr().err
    assert main(["bench", "memory", "--arch", str(path), "--per-chip-batch", "2"]) == 2
    assert "--per-chip-batch needs --target" in capsys.readouterr().err


def test_train_compile_only_plans_the_command_for_a_target_and_writes_nothing(tiny_models, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_models["llama"]), "--out", str(out), "--seq-len", "64", "--batch-size", "2",
            "--quant", "nf4", "--compile-only", "--target", "h100"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "for h100 (1 x NVIDIA H100 SXM 80GB)" in report and "remat none" in report and ": fits" in report
    assert "per chip (counted by XLA:CPU): a step takes at least" in report and "so MFU <= " in report
    assert not out.exists()
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.0000001")  # about 8 KB usable
    # (`auto` would try every policy first; test_a_step_that_does_not_fit... covers that ladder.)
    assert main([*argv, "--remat", "full"]) == 2
    captured = capsys.readouterr()
    assert "remat full" in captured.out and "does not fit" in captured.out
    assert "--target h100: the step does not fit one chip" in captured.err and not out.exists()
    assert main(["train", "--model", str(tiny_models["llama"]), "--out", str(out), "--compile-only"]) == 2
    assert "--compile-only needs --target" in capsys.readouterr().err


def test_attention_follows_the_target_platform_and_cudnn_is_refused_for_packed_training(tiny_models, tmp_path,
                                                                                          capsys):
    import importlib.util

    from crma_jax.attention import MaskInfo, compiling_for, resolve_impl
    from crma_jax.sharding import make_mesh

    q = jax.ShapeDtypeStruct((1, 2048, 4, 64), jnp.bfloat16)
    mask = MaskInfo()
    assert compiling_for() == "cpu" and resolve_impl("auto", q, q, mask) == "blockwise"
    for name, platform, impl in (("h100", "gpu", "cudnn"), ("v5e-1", "tpu", "blockwise")):
        mesh = make_mesh((1, 1, 1), targets.target_devices(targets.resolve_target(name)))
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as a target's step is traced
            assert compiling_for() == platform and resolve_impl("auto", q, q, mask) == impl
    # crma train packs documents into rows (segment ids), which cuDNN's kernel cannot take;
    # without the cuDNN library JAX cannot even trace it. Either way: a clear error, nothing written.
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_models["llama"]), "--out", str(out), "--seq-len", "1024",
                 "--dtype", "bfloat16", "--attention", "cudnn", "--compile-only", "--target", "h100"]) == 2
    err = capsys.readouterr().err
    has_cudnn = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.cudnn") is not None
    expected = "packed segment ids" if has_cudnn else "install nvidia-cudnn-cu12"
    assert "attention impl 'cudnn'" in err and expected in err and "internal error" not in err, err
    assert not out.exists()

