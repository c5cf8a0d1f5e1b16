"""A layout planner: what a configuration needs per GPU on a cluster, on paper (the command line and the text
of ``python -m sparselm.plan``, whose ``sparselm/plan.py`` imports ``main`` from here).

    python -m sparselm.plan --config moe_1b --gpus 8 --gpu-mem 80 [--tp T --pp P --ep E --ds-config NAME
        --micro-batch M] [--section.key=value ...] [--search] [--json]

Per-rank memory and step time of a layout on paper (``planner.plan_layout``), or every valid layout of the
GPU count ranked by estimated step time (``advice.search``), with the smallest change that fits when nothing
does (``advice.smallest_fix``).  Every assumption is printed and settable (``--name value``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from sparselm.config import field_docs, load_config
from sparselm.errors import USER_ERRORS, ConfigError
from sparselm.planning.advice import search, smallest_fix
from sparselm.planning.assumptions import Assumptions, GiB
from sparselm.planning.holdings import KINDS
from sparselm.planning.layouts import configure, nearest_valid_worlds
from sparselm.planning.memory import precision_bytes
from sparselm.planning.planner import Plan, plan_layout
from sparselm.training.runtime import quiet_third_party


def _gb(x: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{x / GiB:.2f}"


def _human(n: float) -> str:
    """A count with a T/B/M/K suffix."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: Plan) -> str:
    """The plan as text: the layout, a table of the first, the busiest middle and the last stage's ranks
    (parameters by kind, every memory component on GPU or host, activations), communication, the step time,
    notes and whether it fits."""
    lay, lines = plan.layout, []
    lines.append(f"layout tp={lay.tp} pp={lay.pp} ep={lay.ep}{f' cp={lay.cp}' if lay.cp > 1 else ''} dp={lay.dp} ({lay.world_size} {plan.device.upper()}s), "
                 f"ds_config={plan.cfg.parallel.ds_config} (ZeRO-{plan.zero_stage}, {precision_bytes(plan.ds) * 8}-bit weights), "
                 f"micro-batch {plan.micro_batch} x {plan.micro_batches}, recomputation {plan.cfg.parallel.recompute}"
                 f"{' every ' + str(plan.cfg.parallel.recompute_every) + ' block(s)' if plan.cfg.parallel.recompute != 'none' else ''}")
    firsts = {}
    for r in plan.ranks:
        firsts.setdefault(r.stage, r)
    last = lay.pp - 1
    middle = [firsts[s] for s in range(1, last)]
    seen = {"stage 0": firsts[0]}
    if middle:
        worst = max(middle, key=lambda r: r.gpu_bytes + r.host_bytes)
        seen[f"stage {worst.stage}" if len(middle) == 1 else f"stages 1-{last - 1}: max, {worst.stage}"] = worst
    if last:
        seen[f"stage {last}"] = firsts[last]
    lines.append("per rank (every rank of a stage alike; GiB = 2^30 bytes):")
    header = ["", *seen]
    rows = [["params (exact)", *[_human(r.params) for r in seen.values()]]]
    for kind in KINDS:
        rows.append([f"  {kind}", *[_human(r.by_kind[kind]) for r in seen.values()]])
    components = []
    for r in seen.values():
        for key in list(r.gpu) + list(r.host):
            if key not in components:
                components.append(key)
    for key in components:
        cells = []
        for r in seen.values():
            where = "GPU" if key in r.gpu else "host" if key in r.host else ""
            cells.append(f"{_gb((r.gpu.get(key) if key in r.gpu else r.host.get(key, 0)))} {where}".strip())
        rows.append([key, *cells])
    rows.append(["GPU total", *[_gb(r.gpu_bytes) for r in seen.values()]])
    rows.append(["host total", *[_gb(r.host_bytes) for r in seen.values()]])
    rows.append(["activations / micro-batch", *[_gb(r.activations["per_micro_batch"]) for r in seen.values()]])
    rows.append(["  with full recomputation", *[_gb(r.activations["per_micro_batch_full"]) for r in seen.values()]])
    rows.append(["  with selective recomputation", *[_gb(r.activations["per_micro_batch_selective"]) for r in seen.values()]])
    rows.append(["  micro-batches in flight", *[str(r.activations["in_flight"]) for r in seen.values()]])
    rows.append(["checkpoint share (fp32 + Adam)", *[_gb(r.checkpoint_bytes) for r in seen.values()]])
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    lines.append("communication per step, bytes one rank sends (busiest stage): "
                 + ", ".join(f"{k} {_gb(v)} GiB" for k, v in plan.comm.items() if v))
    tm = plan.time
    lines.append(f"step time (estimate): {tm['step_s']:.3f} s = compute {tm['compute_s']:.3f} s x (1 + bubble "
                 f"{tm['bubble_fraction']:.3f}) + communication "
                 + " + ".join(f"{k} {v:.3f}" for k, v in tm["comm_s"].items()) + f" + offload {tm['offload_s']:.3f}"
                 + f" ({_human(tm['model_flops_per_step'])} FLOPs, {_human(tm['active_params'])} active matmul parameters per token)")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append(f"fits: {'yes' if plan.fits else 'NO: ' + plan.why}")
    return "\n".join(lines)


def format_assumptions(assume: Assumptions) -> str:
    """Every assumption with its flag, value and meaning."""
    docs = field_docs(Assumptions)
    return "assumptions (set with --name value):\n" + "\n".join(
        f"  --{f.name.replace('_', '-')} {getattr(assume, f.name)}: {docs.get(f.name, '')}" for f in dataclasses.fields(assume))


def main(argv: list[str] | None = None) -> dict:
    """``python -m sparselm.plan``: parse ``argv`` (default sys.argv), plan one layout or search them, print
    the result (and a JSON object last with --json) and return it as a dict.  Bad input exits with status 2
    and one line naming the problem."""
    parser = argparse.ArgumentParser(prog="python -m sparselm.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name or YAML path")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in the job")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per GPU")
    parser.add_argument("--host-mem", type=float, default=None, help="GiB of host memory per node (checked when given)")
    parser.add_argument("--tp", type=int, default=None)
    parser.add_argument("--pp", type=int, default=None)
    parser.add_argument("--ep", type=int, default=None)
    parser.add_argument("--cp", type=int, default=None, help="context-parallel degree (parallel.cp)")
    parser.add_argument("--search-cp", default=None,
                        help="with --search: context-parallel degrees to try, comma-separated (default: --cp or the config's)")
    parser.add_argument("--ds-config", default=None, help="DeepSpeed JSON name or path (parallel.ds_config)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (train.micro_batch_size)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: the ranks are CPU processes (everything in host memory; the step time still "
                             "uses --peak-tflops)")
    parser.add_argument("--search", action="store_true", help="rank every valid layout of --gpus that fits")
    parser.add_argument("--top", type=int, default=8, help="layouts printed by --search")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    defaults = Assumptions()
    for f in dataclasses.fields(Assumptions):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                            help=field_docs(Assumptions).get(f.name))
    args, overrides = parser.parse_known_args(argv)
    assume = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})

    quiet_third_party()
    if args.gpus < 1 or args.gpu_mem <= 0:
        parser.exit(2, "sparselm.plan: error: --gpus must be >= 1 and --gpu-mem > 0\n")
    try:
        cfg = load_config(args.config, overrides, check=False)
        cfg = configure(cfg, args.tp, args.pp, args.ep, args.ds_config, args.micro_batch, cp=args.cp)
        cp_options = tuple(int(c) for c in args.search_cp.split(",")) if args.search_cp else None
        result = _run(cfg, args, assume, cp_options)
    except USER_ERRORS as err:
        parser.exit(2, f"sparselm.plan: error: {err}\n")
    if args.json:
        print(json.dumps(result))
    return result


def _run(cfg, args, assume, cp_options=None) -> dict:
    """Plan or search for the parsed ``args``; raises ConfigError when no layout can run."""
    world, out = args.gpus, print
    out(format_assumptions(assume))
    if not args.search:
        try:
            plan = plan_layout(cfg, world, args.gpu_mem, args.host_mem, args.device, assume)
        except ConfigError as err:
            near = nearest_valid_worlds(cfg, world) if "world size" in str(err) or "data-parallel size" in str(err) else []
            hint = f"; GPU counts with a valid layout nearby: {', '.join(map(str, near))}" if near else ""
            raise ConfigError(f"this layout cannot run: {err}{hint}") from None
        out(format_plan(plan))
        result = {"fits": plan.fits, **plan.as_dict()}
        if not plan.fits:
            fix = smallest_fix(cfg, world, args.gpu_mem, args.host_mem, args.device, assume)
            result["smallest_fix"] = fix
            out(f"smallest change that fits: {fix}" if fix else
                "no single change tried fits (ep, tp, pp, recomputation, micro-batch, offload, up to 16x the GPUs)")
        return result
    fitting, refused, too_big = search(cfg, world, args.gpu_mem, args.host_mem, args.device, assume, cp_options=cp_options)
    if not fitting and not too_big:
        near = nearest_valid_worlds(cfg, world)
        reasons = sorted({reason for _, reason in refused})[:3]
        raise ConfigError(f"no layout of {world} GPUs passes the start-up checks (e.g. {' | '.join(reasons)})"
                          + (f"; GPU counts with a valid layout nearby: {', '.join(map(str, near))}" if near else ""))
    out(f"{len(fitting)} of {len(fitting) + len(too_big)} valid layouts of {world} GPUs fit "
        f"({len(refused)} refused by the start-up checks); ranked by estimated step time:")
    out("  rank  tp  pp  ep  cp   dp  recompute  ZeRO  GPU GiB  host GiB  step s  bubble  why not")
    for i, p in enumerate(fitting[:args.top] + sorted(too_big, key=lambda p: max(r.gpu_bytes for r in p.ranks))[:3]):
        lay = p.layout
        out(f"  {str(i + 1) if p.fits else '-':>4}  {lay.tp:>2}  {lay.pp:>2}  {lay.ep:>2}  {lay.cp:>2}  {lay.dp:>3}  "
            f"{p.cfg.parallel.recompute:>9}  {p.zero_stage:>4}  "
            f"{max(r.gpu_bytes for r in p.ranks) / GiB:>7.1f}  {max(r.host_bytes for r in p.ranks) / GiB:>8.1f}  "
            f"{p.time['step_s']:>6.2f}  {p.time['bubble_fraction']:>6.2f}  {p.why}")
    result = {"fits": bool(fitting), "gpus": world, "layouts": [p.as_dict() for p in fitting],
              "refused": [{"tp": tp, "pp": pp, "ep": ep, "cp": cp, "recompute": ac, "why": why}
                          for (tp, pp, ep, cp, ac), why in refused]}
    if fitting:
        out("best layout:")
        out(format_plan(fitting[0]))
    else:
        fix = smallest_fix(cfg, world, args.gpu_mem, args.host_mem, args.device, assume, searched=True)
        result["smallest_fix"] = fix
        out("no layout fits; smallest change that fits: " + (fix or "none found (recomputation, micro-batch, offload, up to 16x the GPUs)"))
    return result


if __name__ == "__main__":
    main()
