"""The kernel card: README.md on the Hub repository's main branch.

Rendered from templates/card.md with what the published build actually contains: YAML front
matter (`library_name: kernels`, the license), how to load it with `get_kernel(..., version=N)`
and with transformers, the functions the package exports (its `__all__`, read from the source
without importing it), the supported variants, and a table and plot of the latest recorded
benchmark results (benchmarks/results/*.json, DESIGN.md's format).
"""

from __future__ import annotations

import ast
import copy
import json
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from string import Template

from .bench import header_line
from .comparison import headline_records, headline_table

TEMPLATE = Path(__file__).parent / "templates" / "card.md"
# The plot shows at most this many shapes, the table at most this many rows; the full
# results are the JSON files on the version branch.
MAX_PLOT_GROUPS = 12
MAX_TABLE_ROWS = 40


@dataclass(frozen=True)
class RenderedCard:
    """The card's markdown and, when there are benchmark results, the SVG plot it links to."""

    markdown: str
    plot_svg: str | None


def render(project: Path, config, repo_id: str, variants: list[tuple[str, str, tuple[str, ...]]], package: Path,
           plot_path: str = "media/benchmarks.svg") -> RenderedCard:
    """Render the card of the project `config` (project.Project) published as `repo_id`.

    `variants` are (name, backend, GPU archs) of every variant on the version branch; `package`
    is a directory holding the kernel's Python package (a built variant), read for `__all__`.
    """
    project = Path(project)
    runs = latest_runs(project / "benchmarks" / "results")
    plot = benchmark_svg({**runs[0], "records": headline_records(runs[0]) or runs[0]["records"]}) if runs else None
    has_scripts = any((project / "benchmarks").glob("benchmark*.py"))
    text = Template(TEMPLATE.read_text()).substitute(
        license=hub_license(config.license),
        name=config.name,
        repo_id=repo_id,
        version=config.version,
        upstream=f"\nUpstream: {config.upstream}\n" if config.upstream else "",
        functions=_functions_markdown(package),
        variants=_variants_markdown(variants),
        benchmarks=_benchmarks_markdown(runs, plot_path if plot else None),
        run_benchmarks=(f"\nRun the benchmark scripts yourself with `kernels benchmark {repo_id} --version "
                        f"{config.version}`.\n" if has_scripts else ""),
    )
    return RenderedCard(text, plot)


def hub_license(spdx: str) -> str:
    """The Hub's license id for an SPDX id (the Hub's ids are the lowercase SPDX ids: bsd-3-clause)."""
    return spdx.lower()


# -- exported functions --------------------------------------------------------------------------
def exported_functions(package: Path) -> list[tuple[str, str, str]]:
    """(name, signature, first docstring line) for each name in the package's `__all__`, in order.

    Names re-exported with `from .module import name` are looked up in that module.
    """
    init = package / "__init__.py"
    if not init.is_file():
        return []
    tree = ast.parse(init.read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names = [e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)]
    defs = _defs(tree)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            source = package / (node.module.replace(".", "/") + ".py")
            if source.is_file():
                found = _defs(ast.parse(source.read_text()))
                for alias in node.names:
                    if alias.name in found:
                        defs.setdefault(alias.asname or alias.name, found[alias.name])
    out = []
    for name in names:
        node = defs.get(name)
        if node is None:
            out.append((name, "", ""))
            continue
        doc = (ast.get_docstring(node) or "").strip().splitlines()
        signature = f"({_parameters(node.args)})" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else ""
        out.append((name, signature, doc[0] if doc else ""))
    return out


def _parameters(args: ast.arguments) -> str:
    """The parameter list with names and defaults only: annotations make a card's line unreadable."""
    bare = copy.deepcopy(args)
    for a in [*bare.posonlyargs, *bare.args, *bare.kwonlyargs, bare.vararg, bare.kwarg]:
        if a is not None:
            a.annotation = None
    return ast.unparse(bare)


def _defs(tree: ast.Module) -> dict[str, ast.AST]:
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _functions_markdown(package: Path) -> str:
    functions = exported_functions(package)
    if not functions:
        return "_The package exports no `__all__`._"
    lines = []
    for name, signature, doc in functions:
        lines.append(f"- `{name}{signature}`" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


# -- variants ------------------------------------------------------------------------------------
# torch<MM>-cxx11-<compute>-<cpu>-<os> / torch-stable-abi<MM>-<compute>-<cpu>-<os>; MM is
# the torch major digit followed by the minor (213 = 2.13), compute is cpu or cu<MAJ><MIN>
# with a one-digit CUDA minor (cu130 = 13.0).
_VARIANT_RE = re.compile(r"^torch(?P<stable>-stable-abi)?(?P<tmaj>\d)(?P<tmin>\d+)(?:-cxx11)?-(?P<compute>[a-z]+\d*)-")


def loads_on(variant_name: str) -> str:
    """Which installations the `kernels` loader selects this variant for, in words."""
    m = _VARIANT_RE.match(variant_name)
    if m is None:
        return ""
    torch = f"{m['tmaj']}.{m['tmin']}"
    torch_req = f"torch >= {torch}" if m["stable"] else f"torch {torch}"
    compute = m["compute"]
    if compute.startswith("cu"):
        major, minor = compute[2:-1], compute[-1]
        return f"{torch_req}, CUDA {major}.x (x >= {minor})"
    return f"{torch_req}, {compute.upper()}"


def _variants_markdown(variants: list[tuple[str, str, tuple[str, ...]]]) -> str:
    lines = ["| variant | backend | GPU architectures | loads on |", "|---|---|---|---|"]
    for name, backend, archs in sorted(variants):
        lines.append(f"| `{name}` | {backend or '-'} | {' '.join(archs) or '-'} | {loads_on(name)} |")
    return "\n".join(lines)


# -- benchmarks ----------------------------------------------------------------------------------
def latest_runs(results: Path) -> list[dict]:
    """The newest recorded attention benchmark run per device, GPU runs first, then newest first.

    Other results files (build times, training loops, build vs Hub) are not attention runs and
    are left out.
    """
    from .comparison import kind_of

    runs: dict[str, dict] = {}
    for path in sorted(results.glob("*.json")) if results.is_dir() else []:
        try:
            run = json.loads(path.read_text())
        except ValueError:
            continue
        if not isinstance(run, dict) or not run.get("records") or kind_of(run) != "attention":
            continue
        run["_file"] = path.name
        device = str(run.get("device", "?"))
        if device not in runs or str(run.get("date", "")) > str(runs[device].get("date", "")):
            runs[device] = run
    # GPU runs first: the card's headline is the first run, and users come for GPU figures.
    return sorted(runs.values(), key=lambda r: (bool(r.get("cuda")), str(r.get("date", ""))), reverse=True)


def _shape(r: dict) -> str:
    heads = f"{r.get('heads_q')}" if r.get("heads_q") == r.get("heads_kv") else f"{r.get('heads_q')}/{r.get('heads_kv')}"
    causal = " causal" if r.get("causal") else ""
    return (f"{r.get('op')} {r.get('dtype')} b{r.get('batch')} s{r.get('seqlen_q')}/{r.get('seqlen_k')} "
            f"h{heads} d{r.get('hdim')}{causal}")


def _benchmarks_markdown(runs: list[dict], plot_path: str | None) -> str:
    if not runs:
        return "No benchmark results are recorded yet (`flash-attn-kernel bench` writes them to `benchmarks/results/`)."
    parts = []
    if plot_path:
        parts.append(f"![TFLOP/s per implementation on {escape(str(runs[0].get('device')))}]({plot_path})\n")
    headline = headline_table(runs[0])
    if headline:
        parts.append(f"**Headline**, {header_line(runs[0])}:\n")
        parts.append(headline + "\n")
        parts.append("Every point, the peers, the decode shape and the training-loop figures: "
                     "`docs/attention-comparison.md` in the source repository and `benchmarks/results/` on the "
                     "version branch.\n")
    for run in runs:
        parts.append(f"**{run.get('device')}**, torch {run.get('torch')}, CUDA {run.get('cuda')}, "
                     f"{run.get('date')} (`benchmarks/results/{run['_file']}` on the version branch)\n")
        parts.append("| shape | implementation | ms | TFLOP/s |")
        parts.append("|---|---|---:|---:|")
        records = run["records"]
        for r in records[:MAX_TABLE_ROWS]:
            ms = f"{r['ms']:.3f}" if isinstance(r.get("ms"), (int, float)) else "-"
            tflops = f"{r['tflops']:.1f}" if isinstance(r.get("tflops"), (int, float)) else "-"
            parts.append(f"| {_shape(r)} | {r.get('impl')} | {ms} | {tflops} |")
        if len(records) > MAX_TABLE_ROWS:
            parts.append(f"\n_{len(records) - MAX_TABLE_ROWS} more rows in the results file._")
        parts.append("")
    return "\n".join(parts).rstrip()


def benchmark_svg(run: dict) -> str | None:
    """A horizontal grouped bar chart of TFLOP/s: one group per shape, one bar per implementation."""
    groups: dict[str, dict[str, float]] = {}
    for r in run["records"]:
        if isinstance(r.get("tflops"), (int, float)):
            groups.setdefault(_shape(r), {})[str(r.get("impl"))] = float(r["tflops"])
    groups = dict(list(groups.items())[:MAX_PLOT_GROUPS])
    if not groups:
        return None
    impls = sorted({impl for g in groups.values() for impl in g})
    palette = ["#e4572e", "#4c72b0", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c", "#c44e52"]
    color = {impl: palette[i % len(palette)] for i, impl in enumerate(impls)}
    top = max(v for g in groups.values() for v in g.values()) or 1.0
    bar, gap, label_w, plot_w = 14, 18, 330, 420
    legend_h = 20 * len(impls) + 10
    height = 40 + sum(len(g) * bar + gap for g in groups.values()) + legend_h
    width = label_w + plot_w + 90
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14">TFLOP/s, {escape(str(run.get("device")))} '
           f'(torch {escape(str(run.get("torch")))}, {escape(str(run.get("date")))})</text>']
    y = 40
    for shape, bars in groups.items():
        out.append(f'<text x="{label_w - 8}" y="{y + len(bars) * bar / 2 + 4:.0f}" text-anchor="end">'
                   f'{escape(shape)}</text>')
        for impl, value in sorted(bars.items()):
            w = plot_w * value / top
            out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{color[impl]}"/>')
            out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 4}">{value:.1f}</text>')
            y += bar
        y += gap
    for impl in impls:
        out.append(f'<rect x="{label_w}" y="{y}" width="12" height="12" fill="{color[impl]}"/>')
        out.append(f'<text x="{label_w + 18}" y="{y + 10}">{escape(impl)}</text>')
        y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"
