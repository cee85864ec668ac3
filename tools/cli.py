"""The `fogmesh` command line: one `command_<name>(args) -> int` function per command.

Exit codes: 0 success, 1 a fogmesh error or a failed check, 2 bad usage, 130 interrupted.
A FogmeshError prints one clear line; a traceback appears only with `-v`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from gateway.errors import ConfigError, FogmeshError

log = logging.getLogger("fogmesh")

Command = Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


# --- gateway -------------------------------------------------------------------------------


def command_gateway_check(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        if args.json:
            _print_json(
                {
                    "ok": False,
                    "problems": [{"path": p.path, "message": p.message} for p in exc.problems],
                }
            )
        else:
            for p in exc.problems:
                print(f"{args.config}: {p}", file=sys.stderr)
            print(f"{args.config}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    cfg = loaded.config
    if args.json:
        _print_json({"ok": True, "devices": len(cfg.devices), "rules": len(cfg.rules)})
    else:
        print(
            f"{args.config}: ok ({len(cfg.devices)} devices, {len(cfg.rules)} rules, uplink {cfg.uplink.url})"
        )
    return 0


def command_gateway_schema(args: argparse.Namespace) -> int:
    from gateway.config import config_json_schema

    _print_json(config_json_schema())
    return 0


def command_gateway_run(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.runtime import run_until_signal

    loaded = load_config(args.config)
    asyncio.run(run_until_signal(loaded))
    return 0


# --- fog -----------------------------------------------------------------------------------


def command_fog_tail(args: argparse.Namespace) -> int:
    from tools.fog_cli import fog_tail

    return fog_tail(args)


# --- modbus ------------------------------------------------------------------------------


def command_modbus_probe(args: argparse.Namespace) -> int:
    from tools.modbus_probe import probe

    return probe(args)


# --- models --------------------------------------------------------------------------------

DEFAULT_PARITY_MODEL = "testdata/tiny_ae_int8.tflite"


def command_model_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.errors import ModelFormatError
    from models.export import export
    from models.pipeline import Pipeline, pipeline_path

    model = Path(args.model)
    given = Path(args.pipeline) if args.pipeline else None
    found = given or pipeline_path(model)
    try:
        pipeline = Pipeline.load(found) if given or found.exists() else None
        blob = export(model.read_bytes(), pipeline)
    except OSError as exc:
        raise FogmeshError(f"{model}: {exc.strerror or exc}") from exc
    except ModelFormatError as exc:
        raise FogmeshError(str(exc)) from exc
    Path(args.output).write_bytes(blob)
    what = f"with the pipeline of {found}" if pipeline else "network only, no pipeline found"
    print(f"{args.output}: {len(blob)} bytes (firmware blob of {args.model}, {what})")
    return 0


def command_model_parity(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from models import parity
    from models.errors import ModelError
    from models.pipeline import Pipeline, pipeline_path

    model = Path(args.model or Path(parity.__file__).parent / DEFAULT_PARITY_MODEL)
    result = parity.run_parity(model, n=args.n, seed=args.seed)
    ok = result["mismatches"] == 0
    try:
        from models.litert import agreement

        tflite = model.read_bytes()
        rng = np.random.default_rng(args.seed)
        xq = rng.integers(-128, 128, size=(args.n, result["layers"][0]["n_in"]), dtype=np.int8)
        result["litert"] = agreement(tflite, xq)
    except ModelError as exc:  # no LiteRT runtime on this machine: say so, TFLM parity stands
        result["litert"] = {"error": str(exc)}
    if args.series:
        try:
            pipe = Pipeline.load(pipeline_path(model))
        except ModelError as exc:
            raise FogmeshError(f"--series needs the model's pipeline: {exc}") from exc
        names, x = _read_channels(Path(args.series))
        if len(names) != len(pipe.channels):
            raise FogmeshError(
                f"{args.series}: {len(names)} channels, the pipeline has {len(pipe.channels)}"
            )
        det = parity.run_detector_parity(model, pipe, x[: args.rows])
        result["detector"] = det
        ok = ok and det["alarm_mismatches"] == 0 and det["int8_input_mismatches"] == 0
    if args.json:
        _print_json(result)
    else:
        print(
            f"{result['model']}: {result['outputs_compared']} outputs compared, "
            f"{result['mismatches']} mismatches; {result['us_per_inference_unix_port']} us per inference "
            f"on the MicroPython unix port, peak heap {result['peak_heap_bytes']} B"
        )
        lite = result["litert"]
        if "error" not in lite:
            print(
                f"LiteRT vs TFLM: {lite['mismatches']} of {lite['outputs_compared']} outputs differ "
                f"(max {lite['max_abs_diff']})"
            )
        if "detector" in result:
            d = result["detector"]
            print(
                f"detector on {d['samples']} rows of {args.series}: {d['alarm_mismatches']} alarm "
                f"and {d['int8_input_mismatches']} int8 input mismatches, "
                f"{d['us_per_sample_unix_port']} us per sample"
            )
    return 0 if ok else 1


_DETECTOR_FLAGS = ("window", "smooth", "quantile", "margin", "epochs", "seed", "holdout")


def _detector_settings(args: argparse.Namespace, channels: list[str]) -> dict[str, Any]:
    """DetectorSettings fields given on the command line; --detrend names one of `channels`."""
    out = {k: getattr(args, k) for k in _DETECTOR_FLAGS if getattr(args, k) is not None}
    if args.hidden is not None:
        out["hidden"] = tuple(int(w) for w in args.hidden.split(",") if w.strip())
    if args.detrend is not None:
        names = [n.strip() for n in args.detrend.split(",") if n.strip()]
        missing = [n for n in names if n not in channels]
        if missing:
            raise FogmeshError(
                f"--detrend: no channel {', '.join(map(repr, missing))} "
                f"(channels: {', '.join(channels)})"
            )
        out["detrend"] = tuple(channels.index(n) for n in names)
    return out


def command_model_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise FogmeshError(f"--data-dir {data_dir}: no such directory")
    try:
        if args.dataset == "nab":
            from models.nab import evaluate_nab

            settings = _detector_settings(args, ["value"])
            result = evaluate_nab(data_dir, progress=not args.json, **settings)
        else:
            from models.evaluate import SKAB_CHANNELS, evaluate_skab

            settings = _detector_settings(args, list(SKAB_CHANNELS))
            result = evaluate_skab(data_dir, progress=not args.json, **settings)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # files not in the format
        raise FogmeshError(str(exc)) from exc
    if not args.verbose:
        result.pop("per_file", None)
    _print_json(result)
    return 0


_LABEL_COLUMNS = ("datetime", "timestamp", "anomaly", "changepoint")


def _read_channels(path: Any) -> tuple[list[str], Any]:
    """Channel names and (n, C) values of a CSV with a header row, ';'- or ','-separated.

    SKAB's format (';', datetime first) and NAB's (',', `timestamp,value`) both work; time and
    label columns are ignored.
    """
    import csv

    import numpy as np

    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise FogmeshError(f"{path}: {exc.strerror or exc}") from exc
    first = text.split("\n", 1)[0]
    rows = list(csv.reader(text.splitlines(), delimiter=";" if ";" in first else ","))
    if len(rows) < 2:
        raise FogmeshError(f"{path}: no data rows")
    keep = [i for i, name in enumerate(rows[0]) if name.strip().lower() not in _LABEL_COLUMNS]
    if not keep:
        raise FogmeshError(f"{path}: no value columns in the header")
    try:
        x = np.array([[float(r[i]) for i in keep] for r in rows[1:] if r], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise FogmeshError(f"{path}: not a numeric CSV with a header ({exc})") from exc
    return [rows[0][i].strip() for i in keep], x


def command_model_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from models.export import export
    from models.pipeline import pipeline_path
    from models.train import DetectorSettings, fit_detector

    names, x = _read_channels(Path(args.csv))
    if len(x) < args.rows:
        raise FogmeshError(f"{args.csv}: {len(x)} rows, fewer than --rows {args.rows}")
    settings = DetectorSettings(**_detector_settings(args, names))
    try:
        det = fit_detector(x[: args.rows], settings, names)
    except ValueError as exc:
        raise FogmeshError(str(exc)) from exc
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tflite = prefix.with_name(prefix.name + ".tflite")
    blob = prefix.with_name(prefix.name + ".bin")
    tflite.write_bytes(det.model.tflite)
    det.pipeline.save(pipeline_path(tflite))
    blob.write_bytes(export(det.model.tflite, det.pipeline))
    meta: dict[str, Any] = {
        "source": Path(args.csv).name,
        "rows": args.rows,
        "channels": names,
        "threshold": det.threshold,
        "settings": dataclasses.asdict(det.settings),
        "sizes": {**det.model.sizes(), "blob_bytes": blob.stat().st_size},
    }
    if len(x) > args.rows:
        # Rows after the training rows: how often the model alarms on them (a false alarm
        # rate when they are normal, as for an anomaly-free recording).
        alarms = det.alarms(x)[args.rows :]
        meta["rest_rows"] = len(alarms)
        meta["rest_alarm_rate"] = round(float(np.mean(alarms)), 4)
    prefix.with_name(prefix.name + ".json").write_text(
        json.dumps(meta, indent=2) + "\n", encoding="utf-8"
    )
    _print_json(
        {
            "tflite": str(tflite),
            "pipeline": str(pipeline_path(tflite)),
            "blob": str(blob),
            **meta,
        }
    )
    return 0


# --- virtual devices -----------------------------------------------------------------------


def command_virtual_plc(args: argparse.Namespace) -> int:
    from tools.virtual_plc.cli import command_virtual_plc as run

    return run(args)


def command_flash(args: argparse.Namespace) -> int:
    from tools.field.flash import command_flash as run

    return run(args)


def command_deploy(args: argparse.Namespace) -> int:
    from tools.field.deploy import command_deploy as run

    return run(args)


def command_provision(args: argparse.Namespace) -> int:
    from tools.field.provision import command_provision as run

    return run(args)


def command_batch_provision(args: argparse.Namespace) -> int:
    from tools.field.batch import command_batch_provision as run

    return run(args)


def command_logs(args: argparse.Namespace) -> int:
    from tools.field.logs import command_logs as run

    return run(args)


def command_doctor(args: argparse.Namespace) -> int:
    from tools.field.doctor import command_doctor as run

    return run(args)


def command_virtual_esp32(args: argparse.Namespace) -> int:
    from tools.virtual_esp32.cli import command_virtual_esp32 as run

    return run(args)


# --- demo and benchmarks -------------------------------------------------------------------


def command_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    return run_demo(args)


def command_bench_gateway(args: argparse.Namespace) -> int:
    from tools.bench_gateway import run_gateway_bench

    if args.json:
        logging.getLogger().setLevel(logging.WARNING)  # 200 "starting -> ok" lines help nobody here
    result = run_gateway_bench(
        devices=args.devices,
        tags=args.tags,
        period_ms=args.period_ms,
        seconds=args.seconds,
        kind=args.kind,
        progress=not args.json,
    )
    _print_json(result)
    return 0


def command_bench_uplink(args: argparse.Namespace) -> int:
    from tools.bench_uplink import run_uplink_bench

    result = run_uplink_bench(messages=args.messages, outages=args.outages, progress=not args.json)
    _print_json(result)
    return 0 if result["lost"] == 0 else 1


# --- mesh ----------------------------------------------------------------------------------


def _mesh_topology(args: argparse.Namespace) -> Any:
    from tools.mesh.topology import from_spec

    return from_spec(args.topology, args.nodes, args.loss, args.seed)


def _run_until_sigterm(coro: Any) -> tuple[bool, Any]:
    """Run `coro`; SIGTERM cancels it like Ctrl-C does. -> (terminated, result)."""
    import signal

    async def main() -> tuple[bool, Any]:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        terminated = False

        def on_term() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        try:
            return False, await task
        except asyncio.CancelledError:
            if terminated:
                return True, None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())


def command_mesh_sim(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tools.mesh.sim import run_cli

    site_key = None
    if args.site_key_file:
        try:
            text = Path(args.site_key_file).read_text(encoding="ascii").strip()
            site_key = bytes.fromhex(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FogmeshError(
                f"--site-key-file {args.site_key_file}: expected 32..128 hex digits ({exc})"
            ) from exc
    topo = _mesh_topology(args)
    terminated, _ = _run_until_sigterm(
        run_cli(
            topo,
            seconds=args.seconds,
            seed=args.seed,
            workdir=args.workdir,
            summary_s=args.summary_s,
            site_key=site_key,
            as_json=args.json,
            main=args.main,
            read_uart=not args.no_uart,
        )
    )
    return 143 if terminated else 0


def command_mesh_medium(args: argparse.Namespace) -> int:
    from tools.mesh.medium import serve

    topo = _mesh_topology(args)
    terminated, _ = _run_until_sigterm(
        serve(topo, port=args.port, seed=args.seed, seconds=args.seconds)
    )
    return 143 if terminated else 0


def command_bench_mesh(args: argparse.Namespace) -> int:
    from tools.mesh.bench import BenchTimeout, run_mesh_bench

    try:
        result = run_mesh_bench(
            nodes=args.nodes,
            loss=args.loss,
            seconds=args.seconds,
            kills=args.kills,
            seed=args.seed,
            summary_s=args.summary_s,
            formation_timeout_s=args.formation_timeout_s,
            progress=not args.json,
            main=args.main,
            settle_s=args.settle_s,
            control_s=args.control_s,
            heapsize=args.heapsize,
        )
    except BenchTimeout as exc:
        _print_json({"error": str(exc), "not_joined": exc.missing})
        return 2
    _print_json(result)
    return 0


# --- parser --------------------------------------------------------------------------------


def _version() -> str:
    try:
        return version("fogmesh")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fogmesh",
        description="Edge-heavy factory IoT: ESP32 mesh nodes, a retrofit gateway, a durable fog uplink.",
    )
    p.add_argument("--version", action="version", version=f"fogmesh {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gw = sub.add_parser("gateway", help="check, describe and run a gateway config")
    gws = gw.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    c = gws.add_parser(
        "check", help="validate a config: every problem with its path; exit 1 if any"
    )
    c.add_argument("config")
    c.add_argument("--json", action="store_true", help="machine-readable result")
    c.set_defaults(func=command_gateway_check)
    s = gws.add_parser("schema", help="print the config's JSON Schema (for editor completion)")
    s.set_defaults(func=command_gateway_schema)
    r = gws.add_parser("run", help="run the gateway until SIGINT/SIGTERM")
    r.add_argument("config")
    r.set_defaults(func=command_gateway_run)

    fog = sub.add_parser("fog", help="look at what reached the fog")
    fogs = fog.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    t = fogs.add_parser(
        "tail", help="print what arrived at a fog (sqlite:///path or mqtt://host:port)"
    )
    t.add_argument("url")
    t.add_argument("--follow", "-f", action="store_true", help="keep printing as messages arrive")
    t.add_argument(
        "--gaps",
        action="store_true",
        help="report missing seqs per gateway and exit 1 if any were lost",
    )
    t.add_argument(
        "--json", action="store_true", help="one JSON object per message (or the gap report)"
    )
    t.add_argument("--seconds", type=float, default=None, help="stop following after this long")
    t.add_argument(
        "--username", default=None, help="MQTT user name (password from FOGMESH_MQTT_PASSWORD)"
    )
    t.set_defaults(func=command_fog_tail)

    mb = sub.add_parser("modbus", help="Modbus tools for integrators")
    mbs = mb.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    pr = mbs.add_parser(
        "probe",
        help="read registers and print every decoding (ints, floats, four byte/word orders, ASCII)",
        description="URL: tcp://host:port, rtu+tcp://host:port (RTU over TCP) or rtu:///dev/ttyUSB0. "
        "ADDRESS: classic notation (40001 = first holding register, 30001 = first input register), "
        "or a plain address with --table.",
    )
    pr.add_argument("url")
    pr.add_argument("--unit", type=int, default=1, help="unit (slave) id, default 1")
    pr.add_argument("--address", required=True)
    pr.add_argument("--count", type=int, default=4, help="registers to read (1..125), default 4")
    pr.add_argument("--table", choices=["holding", "input"], default=None)
    pr.add_argument(
        "--addressing", type=int, choices=[0, 1], default=0, help="base of a plain --address"
    )
    pr.add_argument("--timeout-s", type=float, default=3.0)
    pr.add_argument("--baudrate", type=int, default=9600, help="for rtu:// ports")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=command_modbus_probe)

    md = sub.add_parser(
        "model", help="quantized anomaly models: export for the firmware, check parity"
    )
    mds = md.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    me = mds.add_parser(
        "export", help="derive the firmware blob (docs/model-format.md) from a full-int8 .tflite"
    )
    me.add_argument("model", help="a full-int8 .tflite of dense layers")
    me.add_argument("-o", "--output", required=True, help="where to write the blob")
    me.add_argument(
        "--pipeline",
        default=None,
        help="the pipeline JSON to fold in (default: NAME.pipeline.json next to the model, if any)",
    )
    me.set_defaults(func=command_model_export)

    def detector_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--window", type=int, default=None, help="feature window, samples (default 10)"
        )
        p.add_argument(
            "--smooth", type=int, default=None, help="score smoothing, past samples (default 10)"
        )
        p.add_argument(
            "--quantile",
            type=float,
            default=None,
            help="threshold quantile of training scores (default 0.99)",
        )
        p.add_argument(
            "--margin", type=float, default=None, help="threshold margin factor (default 1.5)"
        )
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument(
            "--holdout",
            type=float,
            default=None,
            help="share of the normal rows kept out of training to calibrate the threshold on",
        )
        p.add_argument(
            "--hidden", default=None, help="hidden layer widths, e.g. 16,4 (mirrored: F→16→4→16→F)"
        )
        p.add_argument(
            "--detrend",
            default=None,
            help="channels whose level drifts in normal operation, comma-separated names: "
            "they enter as value − rolling mean and rolling std only",
        )

    mt = mds.add_parser(
        "train",
        help="fit features, the int8 autoencoder and its threshold on normal rows of a CSV (needs the train extra)",
    )
    mt.add_argument(
        "--csv", required=True, help="a SKAB-format CSV (';'-separated, datetime first)"
    )
    mt.add_argument(
        "--rows", type=int, default=400, help="normal rows to fit on, from the start (default 400)"
    )
    mt.add_argument(
        "--out",
        required=True,
        help="output prefix: PREFIX.tflite, PREFIX.pipeline.json, PREFIX.bin (firmware blob v2), PREFIX.json (metrics)",
    )
    detector_flags(mt)
    mt.set_defaults(func=command_model_train)
    mv = mds.add_parser(
        "eval",
        help="evaluate the int8 pipeline with a benchmark's protocol (needs the train extra)",
    )
    mv.add_argument("--dataset", choices=["skab", "nab"], required=True)
    mv.add_argument(
        "--data-dir", required=True, help="the dataset's folder (never copied into the project)"
    )
    mv.add_argument(
        "--json",
        action="store_true",
        help="JSON only on stdout (progress goes to stderr otherwise)",
    )
    detector_flags(mv)
    mv.set_defaults(func=command_model_eval)
    mp = mds.add_parser(
        "parity",
        help="run inputs through the TFLM interpreter and the firmware engine on the MicroPython unix port",
    )
    mp.add_argument(
        "--model", default=None, help="a full-int8 .tflite (default: the shipped test autoencoder)"
    )
    mp.add_argument(
        "-n", type=int, default=1000, help="random inputs besides the edge cases (default 1000)"
    )
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument(
        "--series",
        default=None,
        help="a CSV of real rows: also score them with the firmware detector and the host "
        "(needs NAME.pipeline.json next to the model)",
    )
    mp.add_argument("--rows", type=int, default=2000, help="rows of --series to use (default 2000)")
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=command_model_parity)

    from tools.field.flash import add_arguments as flash_arguments
    from tools.virtual_esp32.cli import add_arguments as esp32_arguments
    from tools.virtual_plc.cli import add_arguments as plc_arguments

    fl = sub.add_parser(
        "flash",
        help="write a firmware image to an ESP32 through its ROM bootloader and verify it (MD5)",
        description="Detects the chip, falls back 921600 -> 460800 -> 115200 baud on link "
        "failures, refuses a board whose MAC is not --expect-mac (docs/field-tools.md).",
    )
    flash_arguments(fl)
    fl.set_defaults(func=command_flash)

    from tools.field.deploy import add_arguments as deploy_arguments
    from tools.field.doctor import add_arguments as doctor_arguments
    from tools.field.logs import add_arguments as logs_arguments
    from tools.field.provision import add_arguments as provision_arguments

    dp = sub.add_parser(
        "deploy",
        help="compile firmware/ with mpy-cross and upload what changed to a board (sha256-verified)",
        description="Interrupts the board (no soft reset), uploads each changed file atomically in "
        "raw-paste mode, verifies its sha256 on the board, removes stale package files "
        "(docs/field-tools.md).",
    )
    deploy_arguments(dp)
    dp.set_defaults(func=command_deploy)
    pv = sub.add_parser(
        "provision",
        help="write a node's config.json (derived key, channel, model) to a board",
        description="The site key comes only from --site-key-file or FOGMESH_SITE_KEY; the board "
        "gets derived keys only; keys are redacted in every output (docs/field-tools.md).",
    )
    provision_arguments(pv)
    pv.set_defaults(func=command_provision)
    from tools.field.batch import add_arguments as batch_arguments

    bt = sub.add_parser("batch", help="field commands over many boards at once")
    bts = bt.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    bp = bts.add_parser(
        "provision",
        help="deploy and provision every board of a manifest, one worker per port",
        description="Reads a TOML manifest (site_key_file, deploy, log_dir, [[boards]] port, "
        "node_id, ...), runs one worker per port, writes a log per board and prints a summary "
        "(docs/field-tools.md).",
    )
    batch_arguments(bp)
    bp.set_defaults(func=command_batch_provision)

    lg = sub.add_parser(
        "logs",
        help="follow a node's serial output (read-only), reconnecting after a replug",
        description="Prints each line the node writes (its JSON log lines as `ev key=value`, or "
        "as JSON with --json); waits for the port to come back after an unplug.",
    )
    logs_arguments(lg)
    lg.set_defaults(func=command_logs)
    dr = sub.add_parser(
        "doctor",
        help="list serial ports (USB ids, by-id paths) and find out why a board does not answer",
        description="Checks --port for permission, another process holding it, a missing path "
        "and a MicroPython REPL answering Ctrl-C; prints each finding with its fix.",
    )
    doctor_arguments(dr)
    dr.set_defaults(func=command_doctor)

    vd = sub.add_parser("virtual", help="virtual devices for tests, demos and HIL rigs")
    vds = vd.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    vp = vds.add_parser(
        "plc",
        help="a virtual PLC: the simulated pumps behind real Modbus TCP/RTU and OPC-UA servers",
        description="Serves the register map and address space of docs/virtual-plc.md; prints its endpoints as JSON.",
    )
    plc_arguments(vp)
    vp.set_defaults(func=command_virtual_plc)
    ve = vds.add_parser(
        "esp32",
        help="a virtual ESP32: its ROM bootloader for esptool and MicroPython on a pty for mpremote",
        description="Serves the ROM serial bootloader at socket://127.0.0.1:PORT over a 4 MB flash "
        "image, and the running board (MicroPython, its own filesystem) behind a pty at "
        "--repl-link; prints the endpoints as one JSON line (docs/field-tools.md).",
    )
    esp32_arguments(ve)
    ve.set_defaults(func=command_virtual_esp32)

    d = sub.add_parser(
        "demo", help="run a virtual plant through the gateway into an embedded fog store"
    )
    d.add_argument("--seconds", type=float, default=20.0)
    d.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary object and nothing else on stdout",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="keep the queue and fog store here (default: a temporary folder)",
    )
    d.add_argument("--quiet", "-q", action="store_true", help="no live lines")
    d.set_defaults(func=command_demo)

    ms = sub.add_parser("mesh", help="the ESP-NOW mesh in simulation (docs/mesh-sim.md)")
    mss = ms.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    def mesh_topology_flags(p: argparse.ArgumentParser, nodes: int) -> None:
        p.add_argument(
            "--nodes", type=int, default=nodes, help=f"nodes, root included (default {nodes})"
        )
        p.add_argument(
            "--topology",
            default="line",
            metavar="line|grid|bench|FILE",
            help="a line, a grid, the benchmark's layered graph, or a topology JSON file",
        )
        p.add_argument(
            "--loss", type=float, default=None, help="loss of every link, 0..1 (default 0)"
        )
        p.add_argument("--seed", type=int, default=0, help="loss and topology seed (default 0)")

    sm = mss.add_parser(
        "sim",
        help="run real MicroPython nodes over the simulated radio and show the tree as it forms",
        description="Starts the radio medium, one MicroPython process per node (firmware/main.py) "
        "and the root's UART on a pty (WORKDIR/ttyMESH, for a gateway's mesh device).",
    )
    mesh_topology_flags(sm, 6)
    sm.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)"
    )
    sm.add_argument(
        "--workdir", default=None, help="node flash directories here (default: a temp dir)"
    )
    sm.add_argument(
        "--summary-s", type=float, default=10.0, help="nodes' summary period (default 10)"
    )
    sm.add_argument(
        "--site-key-file",
        default=None,
        help="the site key as hex (default: a random key per run)",
    )
    sm.add_argument("--json", action="store_true", help="events as JSON lines, then a summary line")
    sm.add_argument(
        "--no-uart",
        action="store_true",
        help="leave WORKDIR/ttyMESH to a gateway's mesh device (deliveries are not counted)",
    )
    sm.add_argument("--main", default=None, help=argparse.SUPPRESS)  # a stand-in firmware (tests)
    sm.set_defaults(func=command_mesh_sim)
    mm = mss.add_parser(
        "medium",
        help="only the radio medium: prints its address, then takes JSON fault commands on stdin",
    )
    mesh_topology_flags(mm, 6)
    mm.add_argument("--port", type=int, default=0, help="UDP port (default: any free)")
    mm.add_argument("--seconds", type=float, default=None, help="stop after this long")
    mm.set_defaults(func=command_mesh_medium)

    b = sub.add_parser("bench", help="benchmarks that print JSON")
    bs = b.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    g = bs.add_parser(
        "gateway",
        help="N virtual Modbus TCP devices × T tags polled by the gateway: throughput, CPU, memory, latency",
    )
    g.add_argument("--devices", type=int, default=200)
    g.add_argument("--tags", type=int, default=30)
    g.add_argument("--period-ms", type=int, default=1000)
    g.add_argument(
        "--seconds", type=float, default=30.0, help="measurement window after a 5 s warm-up"
    )
    g.add_argument(
        "--kind", choices=["uint16", "float32"], default="uint16", help="register type of every tag"
    )
    g.add_argument(
        "--json", action="store_true", help="JSON only (always JSON; this silences progress)"
    )
    g.set_defaults(func=command_bench_gateway)
    u = bs.add_parser(
        "uplink", help="store-and-forward through a local Mosquitto with broker outages"
    )
    u.add_argument("--messages", type=int, default=20000)
    u.add_argument("--outages", type=int, default=3)
    u.add_argument(
        "--json", action="store_true", help="JSON only (always JSON; this silences progress)"
    )
    u.set_defaults(func=command_bench_uplink)
    bm = bs.add_parser(
        "mesh",
        help="N simulated MicroPython nodes: delivery, reroute, formation, overhead, heap",
    )
    bm.add_argument("--nodes", type=int, default=30)
    bm.add_argument("--loss", type=float, default=0.1, help="loss of every link (default 0.1)")
    bm.add_argument("--seconds", type=float, default=60.0, help="traffic window after formation")
    bm.add_argument(
        "--kills", type=int, default=3, help="parent kills spread over the window (default 3)"
    )
    bm.add_argument("--seed", type=int, default=1)
    bm.add_argument(
        "--summary-s", type=float, default=5.0, help="nodes' summary period (default 5)"
    )
    bm.add_argument(
        "--formation-timeout-s",
        type=float,
        default=120.0,
        help="exit 2 if the mesh has not formed by then",
    )
    bm.add_argument(
        "--heapsize",
        default="100k",
        help="sensor nodes' MicroPython heap (default 100k, an ESP32's; the root gets 256k)",
    )
    bm.add_argument(
        "--settle-s",
        type=float,
        default=130.0,
        help="after formation, time for Trickle to back off to Imax (default 130)",
    )
    bm.add_argument(
        "--control-s",
        type=float,
        default=120.0,
        help="steady-state window in which control traffic is measured; 0: use the traffic "
        "window (default 120)",
    )
    bm.add_argument(
        "--json", action="store_true", help="JSON only (always JSON; this silences progress)"
    )
    bm.add_argument("--main", default=None, help=argparse.SUPPRESS)  # a stand-in firmware (tests)
    bm.set_defaults(func=command_bench_mesh)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # Vendor libraries narrate every connect and close at INFO; our own lines say what matters.
        for noisy in ("asyncua", "pymodbus"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    func: Command = args.func
    try:
        return func(args)
    except FogmeshError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"fogmesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
