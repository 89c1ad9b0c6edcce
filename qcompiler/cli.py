"""The ``qcompile`` command line.

``qcompile MODEL --w8a8 [-o OUT] ...`` compiles (the default command); ``qcompile plan``
shows what a compile would do; ``qcompile eval`` measures a compiled model against its float
original; ``qcompile models`` exports the reference models and their data. Bad input ends with
one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import click

from qcompiler import __version__, calib_data
from qcompiler.config import (
    ACTIVATION_SCHEMES,
    TARGETS,
    WEIGHT_ONLY_METHODS,
    KV_CACHE_DTYPES,
    CalibrationConfig,
    FP8Config,
    Int8MixedConfig,
    KVCacheConfig,
    W8A8Config,
    WeightOnlyConfig,
)
from qcompiler.errors import QCompileError, VerificationError, first_line
from qcompiler.ranges import CALIBRATION_METHODS
from qcompiler.sensitivity import Objective

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


# Recipe flags share one destination (``recipe``): two of them would silently keep the last.
RECIPE_FLAGS = ("--w8a8", "--w4a16", "--w8a16", "--fp8", "--int8-mixed")


class _DefaultCommandGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``compile``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        recipes = sorted({a for a in args if a in RECIPE_FLAGS})
        if len(recipes) > 1:  # they share one destination: the last would win silently
            raise click.UsageError(f"choose one recipe, not {' and '.join(recipes)}")
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcompile")
def cli() -> None:
    """qcompile: quantize ONNX models.

    \b
      qcompile model.onnx --w8a8 -o model.w8a8.onnx [--calib-data calib.npz]
      qcompile plan model.onnx --w8a8
      qcompile eval model.onnx model.w8a8.onnx --task embedding|lm|image
      qcompile models export minilm
    """


def _recipe_options(f):
    options = [
        click.option("--w8a8", "recipe", flag_value="w8a8",
                     help="int8 per-channel weights, 8-bit activations."),
        click.option("--w4a16", "recipe", flag_value="w4a16",
                     help="4-bit weights in groups of 128 (LM head 8-bit), float activations (GPTQ with "
                          "calibration data, else round-to-nearest)."),
        click.option("--w8a16", "recipe", flag_value="w8a16",
                     help="int8 per-channel weights, float activations."),
        click.option("--fp8", "recipe", flag_value="fp8",
                     help="float8 E4M3 weights (per channel; per tensor for ort-cuda) and static "
                          "per-tensor activations as Q/DQ (needs calibration data)."),
        click.option("--int8-mixed", "recipe", flag_value="int8-mixed",
                     help="LLM.int8(): int8 weights per column and activations per row, a few "
                          "outlier input channels per layer in fp16, chosen from calibration data "
                          "(ort-cuda: qcompile's MixedInt8MatMul custom op)."),
        click.option("--outlier-error", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
                     help="--int8-mixed: a layer's outlier set is the smallest meeting this "
                          "relative output error (default 0.01), at most 2%% of its inputs."),
        click.option("--kv-cache", type=click.Choice(KV_CACHE_DTYPES),
                     help="Decoder graphs with past key/values: keep the KV cache in int8 or fp8 "
                          "(per-token, per-head scales); alone or with a recipe."),
        click.option("--activations", type=click.Choice(ACTIVATION_SCHEMES),
                     help="static (calibrated, per tensor) | dynamic (per tensor) | per-token. "
                          "Default: static with calibration data, per-token-sym without."),
        click.option("--calib-data", type=click.Path(path_type=Path),
                     help=".npz of stacked samples named after the inputs, or a folder of .npz feeds."),
        click.option("--calib-text", type=click.Path(path_type=Path),
                     help="Plain text to calibrate a language model or encoder (needs --tokenizer)."),
        click.option("--tokenizer", type=click.Path(path_type=Path),
                     help="Tokenizer folder for --calib-text."),
        click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
                     help="Window length for --calib-text on a language model."),
        click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default="mse",
                     show_default=True, help="How static activation ranges are chosen."),
        click.option("--percentile", type=float, default=99.999, show_default=True,
                     help="Two-sided percentile kept by --calib-method percentile."),
        click.option("--max-calib-samples", type=click.IntRange(min=1),
                     help="Use at most this many calibration samples."),
        click.option("--exclude", multiple=True, metavar="NODE",
                     help="Keep this node in float (repeatable)."),
        click.option("--keep-embeddings-float", is_flag=True,
                     help="Leave embedding tables (Gather) in float."),
        click.option("--float-residuals", is_flag=True,
                     help="Static: quantize only the inputs of weighted ops; residual adds stay "
                          "float (more accurate on CNNs, slower)."),
        click.option("--smoothquant/--no-smoothquant", default=None,
                     help="Fold per-channel scales that move activation outliers into the "
                          "weights (needs calibration data). Default: on when calibration finds "
                          "outlier channels."),
        click.option("--smoothquant-alpha", type=click.FloatRange(0.0, 1.0),
                     help="Fix SmoothQuant's migration strength α (default: searched per layer)."),
        click.option("--max-ppl-increase", type=click.FloatRange(min=0.0), metavar="PERCENT",
                     help="W8A8 static and FP8: keep the most sensitive layers in float until perplexity "
                          "(language models) rises at most PERCENT on calibration windows."),
        click.option("--min-cosine", type=click.FloatRange(0.0, 1.0, min_open=True),
                     help="W8A8 static and FP8: … until the output's mean cosine to float is at least this (encoders)."),
        click.option("--min-top1-agreement", type=click.FloatRange(0.0, 1.0, min_open=True),
                     help="W8A8 static and FP8: … until top-1 agrees with float on at least this fraction (classifiers)."),
        click.option("--max-float-fraction", type=click.FloatRange(0.0, 1.0),
                     help="With an accuracy target: at most this fraction of layers in float (default 0.1)."),
        click.option("--sensitivity-samples", type=click.IntRange(min=1),
                     help="With an accuracy target: calibration samples held apart to measure it on (default 8, spread over the set)."),
        click.option("--sensitivity-margin", type=float,
                     help="With an accuracy target: standard errors of the per-sample mean to spare (default 0)."),
        click.option("--fallback", type=click.Choice(["per-token", "float"]),
                     help="With an accuracy target: where sensitive layers go first (default on "
                          "ort-cpu: per-token activations, then float; elsewhere: float)."),
        click.option("--method", type=click.Choice(WEIGHT_ONLY_METHODS),
                     help="Weight-only: rtn | gptq | awq | awq-gptq (AWQ's scales, then GPTQ) | "
                          "kmeans (default auto: with calibration data, GPTQ (act-order, clip search) "
                          "with and without AWQ's scales both compiled, the one losing least on "
                          "held-apart calibration samples kept; else rtn)."),
        click.option("--bits", type=click.Choice(["2", "3", "4", "8"]),
                     help="Weight-only: bits per weight (default: the recipe's)."),
        click.option("--group-size", type=click.IntRange(min=0),
                     help="Weight-only: input channels per scale (default 128 for --w4a16; "
                          "omitted with --bits/--w8a16: per channel; 0: one k-means codebook "
                          "per tensor)."),
        click.option("--symmetric/--asymmetric", default=None,
                     help="Weight-only: signed weights without zero point (default: asymmetric)."),
        click.option("--act-order", is_flag=True,
                     help="GPTQ: quantize input channels by decreasing Hessian diagonal."),
        click.option("--clip-search", is_flag=True,
                     help="GPTQ: search each group's clipping range (H-weighted rounding error)."),
        click.option("--lm-head-bits", type=click.Choice(["2", "3", "4", "8", "same"]),
                     help="Weight-only: bits of the MatMul producing the logits (default 8, "
                          "per channel; same: as --bits)."),
        click.option("--keep-grid/--no-keep-grid", default=True, show_default=True,
                     help="Weight-only: keep weights that already lie on a low-bit grid (GGUF, "
                          "QAT) exactly on it."),
        click.option("--target", type=click.Choice(TARGETS), default="ort-cpu",
                     show_default=True,
                     help="ort-cpu: ONNX Runtime's integer kernels (QLinearConv, "
                          "MatMulIntegerToFloat…); qdq: portable Q/DQ by TensorRT's placement "
                          "rules; ort-cuda: Q/DQ on weighted ops only, for the CUDA provider."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


WEIGHT_ONLY_OPTIONS = ("method", "bits", "group_size", "symmetric", "act_order", "clip_search", "lm_head_bits")
W8A8_OPTIONS = ("activations", "float_residuals", "smoothquant", "smoothquant_alpha", "max_ppl_increase",
                "min_cosine", "min_top1_agreement", "max_float_fraction", "sensitivity_samples",
                "sensitivity_margin", "fallback")


def _config(recipe, calibration, options: dict):
    """The recipe's config from the command-line options (bad combinations → QCompileError)."""
    if recipe is None and options.get("kv_cache"):
        return KVCacheConfig(options["kv_cache"])
    if recipe is None:
        raise QCompileError("choose a recipe: --w8a8, --w4a16, --w8a16, --fp8 (or --kv-cache alone)")
    calib = CalibrationConfig(options["calib_method"], options["percentile"], options["max_calib_samples"])
    if recipe == "fp8":
        return _fp8_config(calibration, calib, options)
    if recipe == "int8-mixed":
        return _int8_mixed_config(calibration, calib, options)
    if options.get("outlier_error") is not None:
        raise QCompileError("--outlier-error applies to --int8-mixed")
    if recipe in ("w4a16", "w8a16"):
        return _weight_only_config(recipe, calibration, calib, options)
    given = [name for name in WEIGHT_ONLY_OPTIONS if options.get(name) not in (None, False)]
    if given:
        raise QCompileError(f"--{given[0].replace('_', '-')} applies to --w4a16/--w8a16, not --w8a8")
    return _w8a8_config(calibration, calib, options)


def _int8_mixed_config(calibration, calib, options):
    given = [name for name in WEIGHT_ONLY_OPTIONS + W8A8_OPTIONS if options.get(name) not in (None, False)]
    if given:
        raise QCompileError(f"--{given[0].replace('_', '-')} does not apply to --int8-mixed")
    if calibration is None:
        raise QCompileError("--int8-mixed picks outlier channels from calibration: pass --calib-data or --calib-text")
    if options["max_calib_samples"] is None:  # 16 feeds measure the channels; all would be slow
        calib = dataclasses.replace(calib, max_samples=16)
    error = options.get("outlier_error")
    return Int8MixedConfig(
        error_target=Int8MixedConfig.error_target if error is None else error,
        calibration=calib,
        exclude=tuple(options["exclude"]),
        quantize_embeddings=not options["keep_embeddings_float"],
        target=options["target"],
    )


def _weight_only_config(recipe, calibration, calib, options):
    given = [name for name in W8A8_OPTIONS if options.get(name) not in (None, False)]
    if given:
        raise QCompileError(f"--{given[0].replace('_', '-')} applies to --w8a8 (weight-only keeps float activations)")
    bits = int(options["bits"]) if options["bits"] else (4 if recipe == "w4a16" else 8)
    group_size = options["group_size"]
    method = options["method"] or ("auto" if recipe == "w4a16" else "rtn")
    if group_size is None and recipe == "w4a16" and not options["bits"] and method != "kmeans":
        group_size = 128
    config = WeightOnlyConfig(
        bits=bits,
        group_size=group_size,
        symmetric=bool(options["symmetric"]),
        method=method,
        act_order=options["act_order"],
        clip_search=options["clip_search"],
        keep_grid=options["keep_grid"],
        lm_head_bits=_head_bits(options["lm_head_bits"]),
        calibration=calib,
        exclude=tuple(options["exclude"]),
        quantize_embeddings=not options["keep_embeddings_float"],
        target=options["target"],
    )
    if (config.act_order or config.clip_search) and calibration is None:
        flag = "--act-order" if config.act_order else "--clip-search"
        raise QCompileError(f"{flag} is a GPTQ option: pass --calib-data or --calib-text")
    if config.needs_calibration and calibration is None:
        raise QCompileError(f"--method {config.method} measures activations: pass --calib-data or --calib-text")
    return config


def _head_bits(option: str | None) -> int | None:
    if option is None:
        return WeightOnlyConfig.lm_head_bits
    return None if option == "same" else int(option)


def _w8a8_config(calibration, calib, options):
    activations, target = options["activations"], options["target"]
    if activations is None:
        static = calibration is not None or target != "ort-cpu"
        activations = "static" if static else "per-token-sym"
    if activations == "static" and calibration is None:
        raise QCompileError(
            "static activations need calibration data: pass --calib-data or --calib-text"
            + (f" (--target {target} is static Q/DQ)" if target != "ort-cpu" else "")
        )
    config = W8A8Config(
        activations=activations,
        calibration=calib,
        exclude=tuple(options["exclude"]),
        quantize_embeddings=not options["keep_embeddings_float"],
        target=target,
        float_residuals=options["float_residuals"],
        smoothquant=options["smoothquant"],
        smoothquant_alpha=options["smoothquant_alpha"],
        accuracy_target=_accuracy_target(options),
        max_float_fraction=_or_default(options["max_float_fraction"], "max_float_fraction"),
        sensitivity_samples=_or_default(options["sensitivity_samples"], "sensitivity_samples"),
        sensitivity_margin=_or_default(options["sensitivity_margin"], "sensitivity_margin"),
        fallback=options["fallback"],
    )
    if config.smoothquant_on and calibration is None:
        raise QCompileError("--smoothquant measures activations: pass --calib-data or --calib-text")
    return config


def _accuracy_target(options) -> Objective | None:
    given = [(kind, options[flag]) for kind, flag in
             (("ppl", "max_ppl_increase"), ("cosine", "min_cosine"), ("top1", "min_top1_agreement"))
             if options[flag] is not None]
    if len(given) > 1:
        raise QCompileError("give one accuracy target: --max-ppl-increase, --min-cosine or --min-top1-agreement")
    if not given and any(options[o] is not None for o in
                         ("max_float_fraction", "sensitivity_samples", "sensitivity_margin", "fallback")):
        raise QCompileError("--max-float-fraction/--sensitivity-samples/--sensitivity-margin/--fallback go with "
                            "an accuracy target "
                            "(--max-ppl-increase, --min-cosine, --min-top1-agreement)")
    return Objective(*given[0]) if given else None


def _or_default(value, field: str):
    return value if value is not None else W8A8Config.__dataclass_fields__[field].default


ACCURACY_TARGET_OPTIONS = ("max_ppl_increase", "min_cosine", "min_top1_agreement", "max_float_fraction",
                           "sensitivity_samples", "sensitivity_margin")


def _fp8_config(calibration, calib, options):
    given = [name for name in (*WEIGHT_ONLY_OPTIONS, *W8A8_OPTIONS)
             if name not in ("method", *ACCURACY_TARGET_OPTIONS) and options.get(name) not in (None, False)]
    if given:
        raise QCompileError(f"--{given[0].replace('_', '-')} does not apply to --fp8")
    method = options.get("method") or "gptq"
    if method not in ("gptq", "rtn"):
        raise QCompileError(f"--fp8 rounds weights by --method gptq or rtn, not {method}")
    source = click.get_current_context().get_parameter_source("calib_method")
    if source == click.core.ParameterSource.DEFAULT:  # fp8's grid is relative: amax, not an mse clip
        calib = dataclasses.replace(calib, method="minmax")
    if calibration is None:
        raise QCompileError("--fp8 uses static activation scales: pass --calib-data or --calib-text")
    target = options["target"] if options["target"] != "ort-cpu" else "qdq"  # fp8 on CPU: Q/DQ reference
    return FP8Config(calibration=calib, exclude=tuple(options["exclude"]), method=method,
                     quantize_embeddings=not options["keep_embeddings_float"], target=target,
                     accuracy_target=_accuracy_target(options),
                     max_float_fraction=_or_default(options["max_float_fraction"], "max_float_fraction"),
                     sensitivity_samples=_or_default(options["sensitivity_samples"], "sensitivity_samples"),
                     sensitivity_margin=_or_default(options["sensitivity_margin"], "sensitivity_margin"))


def _calibration(calib_data_path, calib_text, tokenizer, seq_len):
    """The calibration files given on the command line, or None."""
    if tokenizer is not None and calib_text is None:
        raise QCompileError("--tokenizer is read only with --calib-text FILE; pass both or neither")
    if calib_data_path is None and calib_text is None:
        return None
    return calib_data.CalibrationInput(calib_data_path, calib_text, tokenizer, seq_len)


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model (default: MODEL with .w8a8.onnx beside it).")
@_recipe_options
@click.option("--verify", "verify_samples", type=click.IntRange(min=0), default=0,
              metavar="N", is_flag=False, flag_value=4,
              help="After compiling, run float, QDQ and lowered models on N (default 4) "
                   "calibration samples; print per-output error; exit 1 when the lowering "
                   "moved an output by more than one quantization step.")
@click.option("--quiet", is_flag=True, help="No progress bars or pass summary.")
def compile_command(model, output, recipe, calib_data, calib_text, tokenizer, seq_len,
                    verify_samples, quiet, **options):
    """Quantize MODEL."""
    from qcompiler import verify
    from qcompiler.pipeline import compile_model

    calibration = _calibration(calib_data, calib_text, tokenizer, seq_len)
    config = _config(recipe, calibration, options)
    kv_cache = KVCacheConfig(options["kv_cache"]) if options.get("kv_cache") else None
    output = output or model.with_name(f"{model.stem}.{recipe or 'kv-' + options['kv_cache']}.onnx")
    result = compile_model(model, output, config, calibration=calibration, progress=not quiet,
                           verify_samples=verify_samples, kv_cache=kv_cache)
    if not quiet:
        for report in result.reports:
            click.echo(f"  {report.name:<30} {report.seconds:7.2f}s  {report.summary()}", err=True)
    click.echo(
        f"wrote {result.output} ({result.input_bytes / 1e6:.1f} MB → "
        f"{result.output_bytes / 1e6:.1f} MB, {config.describe()}, "
        f"target {config.target}, {result.seconds:.1f}s)"
    )
    for note in result.notes:
        click.echo(f"  note: {note}", err=True)
    if config.target == "ort-cuda" and isinstance(config, W8A8Config):
        click.echo("  note: ONNX Runtime's CUDA provider runs DequantizeLinear → MatMul no faster "
                   "than fp16 (measured on an H100): this output saves memory, not time, until "
                   "qcompile's CUDA kernels land", err=True)
    if result.verification is not None:
        for line in result.verification.lines():
            click.echo(f"  verify {line}")
    verify.require(result.verification)


@cli.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@_recipe_options
def plan_command(model, recipe, calib_data, calib_text, tokenizer, seq_len, **options):
    """Print the passes a compile would run and what each would change; write nothing."""
    from qcompiler.pipeline import plan

    calibration = _calibration(calib_data, calib_text, tokenizer, seq_len)
    config = _config(recipe, calibration, options)
    click.echo(f"{model}: {recipe or config.name}, {config.describe()}, target {config.target}")
    for report in plan(model, config):
        click.echo(f"  {report.name:<30} {report.summary()}")


@cli.command("eval")
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["embedding", "lm", "image"]), required=True)
@click.option("--data", type=click.Path(path_type=Path),
              help="Evaluation feeds (.npz or folder); default: the task's held-apart reference set.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Tokenizer folder (embedding, lm).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate on at most this many items.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per model for latency.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def eval_command(float_model, quant_model, task, data, tokenizer, limit, threads, runs, json_path):
    """Accuracy, size and latency of QUANT_MODEL against FLOAT_MODEL."""
    from qcompiler import eval_data
    from qcompiler.evaluate import evaluate
    from qcompiler.ir_utils import load_model

    if data is not None:
        dataset = eval_data.npz_eval_data(data, calib_data.input_specs(load_model(float_model)))
    else:
        dataset = eval_data.default_eval_data(task, tokenizer, limit)
    result = evaluate(float_model, quant_model, task, dataset, threads=threads, latency_runs=runs)
    width = max(len(name) for name, _ in result.rows())
    click.echo(f"{task}: {quant_model} against {float_model}")
    for name, value in result.rows():
        click.echo(f"  {name:<{width}}  {value}")
    if json_path is not None:
        _write_json_atomic(json_path, result.as_dict())


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2))
    os.replace(tmp, path)


def _json_safe(value):
    """Infinite and NaN floats as the strings "inf", "-inf", "nan" (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@cli.command("diff")
@click.argument("model_a", type=click.Path(path_type=Path))
@click.argument("model_b", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path),
              help="Feeds (.npz or folder): also run both models and compare each quantized layer's output.")
@click.option("--limit", type=click.IntRange(min=1), default=8, show_default=True,
              help="Feeds to run with --data.")
@click.option("--top", type=click.IntRange(min=1), help="Show only the N worst layers.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--html", "html_path", type=click.Path(path_type=Path),
              help="Also write a self-contained HTML page (tables, charts, a layer's subgraph).")
@click.option("--show-layer", help="Layer (or node name) drawn before/after in the HTML page (default: the worst).")
def diff_command(model_a, model_b, data, limit, top, threads, json_path, html_path, show_layer):
    """What changed from MODEL_A (float) to MODEL_B (compiled), layer by layer."""
    import itertools

    from qcompiler import diff
    from qcompiler.ir_utils import load_model

    report = diff.diff_models(model_a, model_b)
    for line in diff.format_diff(report):
        click.echo(line)
    payload, rows, outputs, inputs = report.as_dict(), None, None, {}
    if data is not None:
        feeds = calib_data.npz_source(data, calib_data.input_specs(load_model(model_a)))
        rows, outputs = diff.numeric_diff(report, itertools.islice(feeds(), limit), threads, inputs)
        for line in diff.format_numeric(rows, outputs, top):
            click.echo(line)
        payload["numeric"] = {"outputs": outputs, "layers": [dataclasses.asdict(r) for r in rows]}
    if json_path is not None:
        _write_json_atomic(json_path, payload)
    if html_path is not None:
        from qcompiler import report_html

        histograms = report_html.activation_histograms(rows, inputs) if rows else None
        report_html.write(html_path, report, rows, outputs, show_layer, histograms)
        click.echo(f"wrote {html_path}")


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="List every quantized and float weighted op.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the summary as JSON.")
def inspect_command(model, verbose, json_path):
    """Ops, bytes by dtype, which ops are quantized and how, and the compile's provenance."""
    from qcompiler import inspect_model

    info = inspect_model.summary(model)
    for line in inspect_model.format_summary(info, verbose):
        click.echo(line)
    if json_path is not None:
        _write_json_atomic(json_path, info)


@cli.group("models")
def models_group() -> None:
    """Export and describe the reference models; build their data."""


@models_group.command("export")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Export again even if cached.")
def models_export(names, force):
    """Export NAMES (default: all) to the cache and print where they are."""
    models = _import_models()
    for name in names or models.MODEL_NAMES:
        ref = models.export(_model_name(models, name), force=force)
        click.echo(f"{ref.name}: {ref.onnx_path}")


@models_group.command("path")
@click.argument("name")
def models_path(name):
    """Print the cached ONNX file of a reference model (exporting it first if needed)."""
    models = _import_models()
    click.echo(models.export(_model_name(models, name)).onnx_path)


@models_group.command("describe")
@click.argument("name")
def models_describe(name):
    """Print a reference model's description as JSON."""
    models = _import_models()
    click.echo(json.dumps(models.describe(_model_name(models, name)), indent=2, default=str))


@models_group.command("data")
@click.argument("name")
@click.option("--split", type=click.Choice(["calib", "eval"]), default="calib", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("-n", "--count", type=click.IntRange(min=1), help="Number of samples.")
def models_data(name, split, output, count):
    """Write calibration or evaluation feeds for a reference model: OUTPUT ending in .npz is
    one stacked file (equal shapes only), any other OUTPUT a folder of one .npz per sample."""
    models = _import_models()
    name = _model_name(models, name)
    if name == "smollm2-decode":
        raise QCompileError("smollm2-decode is fed by its decode loop (qcompiler.decode_eval); for "
                            "calibration windows use: qcompile models data smollm2")
    feeds = models.data.model_feeds(name, split, count)
    try:
        written = models.data.save_feeds_npz(feeds, output)
    except ValueError as exc:
        raise QCompileError(str(exc)) from exc
    click.echo(f"wrote {len(feeds)} {split} samples for {name} to {written}")


def _import_models():
    try:
        import models
        import models.data  # noqa: F401
    except ImportError as exc:
        raise QCompileError(f"the reference models need the models extra: {exc}") from exc
    return models


def _model_name(models, name: str) -> str:
    if name not in models.MODEL_NAMES:
        raise QCompileError(f"unknown reference model {name!r}; choose one of {', '.join(models.MODEL_NAMES)}")
    return name


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``with``/``finally`` cleans up on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: QCompileError and usage errors → one line and exit code 2; SIGINT and
    SIGTERM → temporary files removed, one line, exit 130 (143 for SIGTERM)."""
    import signal
    import threading

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="qcompile", standalone_mode=False)
    except VerificationError as exc:  # the model was written but failed its check
        click.echo(f"qcompile: verification failed: {exc}", err=True)
        return EXIT_INTERNAL
    except QCompileError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        click.echo(f"qcompile: error: {message}", err=True)
        return EXIT_BAD_INPUT
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        terminated = isinstance(exc, _Terminated) or isinstance(exc.__cause__, _Terminated)
        click.echo(f"qcompile: interrupted by {'SIGTERM' if terminated else 'SIGINT'}; "
                   "temporary files removed, no partial output left", err=True)
        return 143 if terminated else 130
    except click.exceptions.NoArgsIsHelpError as exc:  # bare ``qcompile``: the help, not an error
        click.echo(exc.ctx.get_help())
        return 0
    except click.UsageError as exc:
        click.echo(f"qcompile: error: {exc.format_message()}", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except OSError as exc:
        click.echo(f"qcompile: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("QCOMPILE_DEBUG") == "1":
            raise
        click.echo(
            f"qcompile: internal error: {type(exc).__name__}: {first_line(exc)} "
            "(set QCOMPILE_DEBUG=1 for the traceback; please report it)",
            err=True,
        )
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
