"""FasterViT any resolution: parity with the reference ``faster_vit_any_res`` at its default sizes, and speed.

Three parts, one process:

1. Parity: the reference any-resolution model (random weights perturbed, non-trivial BN statistics) loaded into
   ours through ``checkpoint_filter_fn``; max abs difference / max |reference| of the logits, generic eval path and
   after ``timm.utils.reparameterize_model`` (fused path), at the reference's default sizes (576x960; 541x960 for
   FasterViT-2, not a multiple of 32) and at a small padded size.
2. Square path unchanged: ``fastervit_0`` at 224, fused eager, this revision against the module as it was before
   the any-resolution change (``--before`` git revision, loaded from git into a private module), same weights,
   interleaved rounds.
3. ``fastervit_0_any_res`` at 576x960: ours fused eager against the reference eager and after its own
   ``switch_to_deploy``, interleaved.

    python benchmarks/fastervit_any_res.py [--threads 2] [--before 23791a4~1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import timm
import torch
from timm.utils import reparameterize_model
from tqdm import tqdm

import frugalvision  # noqa: F401  (registers our architectures)
from frugalvision.bench import benchmark, result_header, results_to_markdown
from frugalvision.models import fastervit
from frugalvision.models.fastervit import checkpoint_filter_fn
from frugalvision.utils.io import atomic_write_text
from frugalvision.utils.testing import perturb_parameters

ROOT = Path(__file__).resolve().parents[1]


def _module_at(rev: str) -> object:
    """The FasterViT module of an earlier revision, imported privately (its registrations are skipped)."""
    src = subprocess.run(["git", "show", f"{rev}:src/frugalvision/models/fastervit.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    name = "frugalvision.models._fastervit_before"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "frugalvision.models"
    with mock.patch("timm.models.register_model", lambda f: f):
        exec(compile(src, f"{rev}:fastervit.py", "exec"), mod.__dict__)
    return mod


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", default="23791a4~1", help="git revision of the module before the change")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--note", default="", help="line on machine load, added to the results")
    p.add_argument("--out", default="benchmarks/results/fastervit_any_res")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fastervit.models.faster_vit_any_res as ref

    # 1. parity
    cases = [("fastervit_0_any_res", None), ("fastervit_2_any_res", None), ("fastervit_0_any_res", (160, 256))]
    parity = []
    for name, size in tqdm(cases, desc="parity"):
        torch.manual_seed(0)
        kw = {} if size is None else {"resolution": list(size)}
        theirs = perturb_parameters(getattr(ref, name.replace("fastervit", "faster_vit"))(**kw)).eval()
        ours = timm.create_model(name, **({} if size is None else {"img_size": size})).eval()
        ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
        x = torch.randn(1, 3, *ours.img_size)
        with torch.no_grad():
            y = theirs(x)
            generic = _rel(y, ours(x))
            fused = _rel(y, reparameterize_model(copy.deepcopy(ours))(x))
        parity.append((name, ours.img_size, generic, fused))
        del theirs, ours

    # 2. square path before/after
    before = _module_at(a.before)
    args = {"window_size": (7, 7, 7, 7), "ct_size": 2, "mlp_ratio": 4, "resolution": 224,
            "hat": (False, False, True, False), **fastervit._ARCHS["fastervit_0"]}
    torch.manual_seed(0)
    new = perturb_parameters(fastervit.FasterViT(**args)).eval()
    old = before.FasterViT(**args).eval()
    old.load_state_dict(new.state_dict(), strict=True)
    new, old = reparameterize_model(new), reparameterize_model(old)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        same = torch.equal(new(x), old(x))
    rows_sq, info = benchmark({f"fastervit_0 fused, before ({a.before})": old, "fastervit_0 fused, this revision": new},
                              img_size=224, batch_size=32, repeats=a.repeats, throughput_repeats=5, warmup=2,
                              memory=False)

    # 3. any resolution at the reference's default size
    torch.manual_seed(0)
    theirs = perturb_parameters(ref.faster_vit_0_any_res()).eval()
    ours = timm.create_model("fastervit_0_any_res").eval()
    ours.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ours), strict=True)
    with torch.no_grad():
        theirs(torch.randn(1, 3, 576, 960))
        deployed = reparameterize_model(copy.deepcopy(theirs))
    rows_ar, info_ar = benchmark({"reference faster_vit_0_any_res (eager)": theirs,
                                  "reference (switch_to_deploy)": deployed,
                                  "ours fastervit_0_any_res (fused eager)": reparameterize_model(ours)},
                                 img_size=(576, 960), batch_size=4, repeats=max(5, a.repeats // 2),
                                 throughput_repeats=3, warmup=1, memory=False)

    cmd = "python " + " ".join(shlex.quote(s) for s in sys.argv)
    lines = [result_header("FasterViT any resolution: parity with the reference and speed", info, cmd).rstrip("\n"), "",
             "## Parity with the reference `faster_vit_any_res` (logits, max abs diff / max |reference|)", "",
             "| model | input | generic path | fused path |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {s[0]}x{s[1]} | {g:.2e} | {f:.2e} |" for n, s, g, f in parity]
    lines += ["", "## Square path: before and after the any-resolution change", "",
              f"Outputs of the two fused models on the same input are bit-identical: {same}.", "",
              results_to_markdown(rows_sq, info, title="fastervit_0 at 224, fused eager").replace("# ", "### ", 1),
              "## Any resolution at 576x960", "",
              results_to_markdown(rows_ar, info_ar, title="fastervit_0_any_res at 576x960").replace("# ", "### ", 1)]
    if a.note:
        lines += ["", a.note]
    lines += ["", "Rows of each table were timed in interleaved rounds, so their ratios stay comparable when other "
              "work shares the machine (see the load average in the machine line); absolute numbers do not."]
    out = Path(a.out).with_suffix(".md")
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
