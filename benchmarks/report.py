"""Writing a benchmark result: results.json, results.md (the table) and two PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gpt2onnx.engine.extras import MissingExtraError, require

log = logging.getLogger(__name__)


def cpu_line(machine: dict) -> str:
    """The machine as a results table's heading says it: CPU, its instruction sets, cores."""
    return f"CPU: {machine.get('cpu')} ({', '.join(machine.get('isa') or [])}), {machine.get('cores')} cores"


def write_small(out: Path, name: str, result: dict, lines: list[str]) -> None:
    """A small benchmark's OUT/NAME.json and OUT/NAME.md (printed too)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def dtype_label(dtype: str, int8_kernel: str | None) -> str:
    """ "int8 rows", "fp32": a model's dtype with its int8 kernel when it has one."""
    return f"{dtype} {int8_kernel}" if int8_kernel else dtype


def markdown(results: dict) -> str:
    m, model = results["machine"], results["model"]
    graph = ("shared KV cache" if model.get("kv_cache") == "shared" else "concat KV cache") + (
        ", fused" if model.get("optimized") else ""
    )
    dtype = dtype_label(model["dtype"], model.get("int8_kernel"))
    label = f"{model['checkpoint']} ({dtype}, {graph}, {model['n_params'] / 1e6:.0f}M params{', RANDOM weights, seed ' + str(model['seed']) if model['random_init'] else ''})"
    failed = [f for f in results.get("failures", []) if f["ours"]]
    lines = [f"**FAILED: {f['runner']} (our engine) failed: {cell(f['reason'])}**  " for f in failed]
    lines += [
        f"Model: {label}  ",
        f"Machine: {m['cpu']} ({', '.join(m.get('isa') or ['instruction sets unknown'])}), {m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}; onnxruntime-gpu {m['versions'].get('onnxruntime-gpu', '?')}, torch {m['versions'].get('torch', '?')}, transformers {m['versions'].get('transformers', '?')}  ",
        f"Read bandwidth: {m['read_bandwidth_gbs']:.1f} GB/s ({m['bandwidth_method']})  ",
        f"Greedy, EOS ignored; medians of {results['settings']['repeats']} runs after {results['settings']['warmup']} warm-up"
        + (
            f", in each of {rounds} alternating rounds"
            if (rounds := results["settings"].get("rounds", 1)) > 1
            else ""
        )
        + ". Every runner runs the weights the model was exported from, at its own precision "
        "(quantized ones drift from fp32's tokens). × ours: decode ms/token over gpt2-onnx's "
        f"({model['dtype']}); × ours at its precision: over ours at the runner's precision, when that ran. "
        "Tokens equal to ours: to ours at the runner's precision when that ran, else to gpt2-onnx's. "
        "% of floor: the time to read the weights and the cache once per step at the measured bandwidth, "
        "over the decode step.",
        "",
        "| runner | precision | batch | prompt | new | TTFT ms | decode ms/token | tokens/s | × ours | × ours at its precision | tokens equal to ours | % of floor | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|",
    ]
    for name, data in results["runners"].items():
        if "skipped" in data or "error" in data:
            left_out = "" if name in {f["runner"] for f in failed} else ", left out"
            note = (
                f"skipped: {data['skipped']}" if "skipped" in data else f"FAILED{left_out}: {data['error']}"
            )
            lines.append(f"| {name} | | | | | | | | | | | | {cell(note)} |")
        lines += [table_row(name, data, r) for r in data.get("results", [])]
    lines.append("")
    for name, data in results["runners"].items():
        if "cuda_graphs" in data:
            state = "on" if data["cuda_graphs"] else "off" if data["cuda_graphs"] is False else "unknown"
            fallback = data.get("cuda_graphs_fallback")
            why = f" (fell back: {fallback})" if fallback else ""
            lines.append(f"{name}: CUDA graphs {state} after the timed runs{why}.  ")
    for name, data in results["runners"].items():
        if "greedy_checked" in data:
            equal, of = data["greedy_prefix_equal_to_transformers"], data["greedy_checked"]
            lines.append(f"{name}: checked before timing: reads our prompt ids as our tokens; its first {equal} "
                         f"of {of} greedy tokens equal transformers' fp32 ones ({data['threads']} threads).  ")  # fmt: skip
    for r in results["runners"]["gpt2-onnx"].get("results", []):
        overhead = r.get("python_overhead_ms", {}).get("median")
        lines.append(
            f"gpt2-onnx batch {r['batch']}, prompt {r['prompt_len']}: Python overhead per decode step (outside session.run) "
            f"{overhead:.3f} ms; bandwidth floor {r['bandwidth_floor_ms']:.2f} ms/step ({r['bytes_per_step'] / 1e6:.0f} MB read), "
            f"so decode runs at {100 * r['fraction_of_floor']:.0f}% of the floor."
        )
    return "\n".join(lines) + "\n"


def table_row(name: str, data: dict, r: dict) -> str:
    """One configuration of one runner; the comparisons with ours are "–" when ours has no result."""
    vs, same = r.get("decode_vs_ours"), r.get("decode_vs_ours_at_precision")
    agree = r.get("token_agreement_at_precision", r.get("token_agreement"))  # like with like when it ran
    cells = [
        name, data.get("precision", ""), r["batch"], r["prompt_len"], r["new_tokens"],
        f"{r['ttft_ms']['median']:.1f}", f"{r['decode_ms_per_token']['median']:.2f}",
        f"{r['tokens_per_s']['median']:.1f}", "–" if vs is None else f"{vs:.2f}×",
        "–" if same is None else f"{same:.2f}× ({r['ours_at_precision']})",
        "–" if agree is None else f"{100 * agree:.0f}%", f"{100 * r['fraction_of_floor']:.0f}%",
        f"{data['peak_rss_mb']:.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "\\|")


def plots(results: dict, out: Path) -> list[Path]:
    """The two PNG plots. Raises MissingExtraError without matplotlib."""
    matplotlib = require("matplotlib", "bench", "plotting")
    ticker = require("matplotlib.ticker", "bench", "plotting")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench", "plotting")

    runners = {n: d for n, d in results["runners"].items() if "results" in d}
    if "gpt2-onnx" not in runners:
        log.warning("plots skipped: gpt2-onnx has no results")
        return []
    prompts = sorted({r["prompt_len"] for r in runners["gpt2-onnx"]["results"]})
    batches = sorted({r["batch"] for r in runners["gpt2-onnx"]["results"]})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, data) in enumerate(runners.items()):
        for prompt, style in zip(prompts, ("-", "--", ":", "-.")):
            pts = sorted(
                (r["batch"], r["tokens_per_s"]["median"])
                for r in data["results"]
                if r["prompt_len"] == prompt
            )
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{name}, prompt {prompt}")
    ax.set(xlabel="batch size", ylabel="tokens/s (median)", title="Throughput", xscale="log", yscale="log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    throughput = out / "throughput_vs_batch.png"
    fig.tight_layout(), fig.savefig(throughput, dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, data in runners.items():
        for r in data["results"]:
            if r["batch"] != 1:
                continue
            steps = [run["step_ms"] for run in r["runs"]]
            median = [sorted(s[i] for s in steps)[len(steps) // 2] for i in range(len(steps[0]))]
            context = [r["prompt_len"] + i + 1 for i in range(len(median))]
            ax.plot(context, median, label=f"{name} (prompt {r['prompt_len']})", linewidth=1)
    ax.set(
        xlabel="context length (tokens)",
        ylabel="ms per token",
        title="Decode step time, batch 1",
        yscale="log",
    )
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    latency = out / "ms_per_token_vs_context.png"
    fig.tight_layout(), fig.savefig(latency, dpi=110), plt.close(fig)
    return [throughput, latency]


def write(results: dict, out: Path) -> list[Path]:
    """Write into `out` (created); each file goes to a temporary name first, then is renamed.
    Without matplotlib the plots are skipped with a warning: the measurements are the result."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("results.json", json.dumps(results, indent=1)), ("results.md", markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(out / name)
        written.append(out / name)
    try:
        return written + plots(results, out)
    except MissingExtraError as e:
        log.warning("plots skipped: %s", e)
        return written
