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

    from models.export import export

    blob = export(Path(args.model).read_bytes())
    Path(args.output).write_bytes(blob)
    print(f"{args.output}: {len(blob)} bytes (firmware blob of {args.model})")
    return 0


def command_model_parity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models import parity

    model = args.model or Path(parity.__file__).parent / DEFAULT_PARITY_MODEL
    result = parity.run_parity(model, n=args.n, seed=args.seed)
    if args.json:
        _print_json(result)
    else:
        print(
            f"{result['model']}: {result['outputs_compared']} outputs compared, "
            f"{result['mismatches']} mismatches; {result['us_per_inference_unix_port']} us per inference "
            f"on the MicroPython unix port, peak heap {result['peak_heap_bytes']} B"
        )
    return 0 if result["mismatches"] == 0 else 1


_DETECTOR_FLAGS = ("window", "smooth", "quantile", "margin", "epochs", "seed")


def _detector_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _DETECTOR_FLAGS if getattr(args, k) is not None}


def command_model_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.evaluate import evaluate_skab

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise FogmeshError(f"--data-dir {data_dir}: no such directory")
    try:
        result = evaluate_skab(data_dir, progress=not args.json, **_detector_settings(args))
    except ValueError as exc:  # a file that is not in SKAB's format
        raise FogmeshError(str(exc)) from exc
    if not args.verbose:
        result.pop("per_file", None)
    _print_json(result)
    return 0


_LABEL_COLUMNS = ("datetime", "anomaly", "changepoint")


def _read_channels(path: Any) -> Any:
    """The numeric channels of a ';'-separated CSV (SKAB's format); label columns are ignored."""
    import csv

    import numpy as np

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=";"))
    except OSError as exc:
        raise FogmeshError(f"{path}: {exc.strerror or exc}") from exc
    if len(rows) < 2:
        raise FogmeshError(f"{path}: no data rows")
    keep = [i for i, name in enumerate(rows[0]) if name.strip().lower() not in _LABEL_COLUMNS]
    try:
        return np.array([[float(r[i]) for i in keep] for r in rows[1:] if r], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise FogmeshError(
            f"{path}: not a ';'-separated numeric CSV with a header ({exc})"
        ) from exc


def command_model_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.train import DetectorSettings, fit_detector

    x = _read_channels(Path(args.csv))
    if len(x) < args.rows:
        raise FogmeshError(f"{args.csv}: {len(x)} rows, fewer than --rows {args.rows}")
    det = fit_detector(x[: args.rows], DetectorSettings(**_detector_settings(args)))
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".tflite").write_bytes(det.model.tflite)
    prefix.with_suffix(".bin").write_bytes(det.model.blob)
    meta = {
        "source": str(args.csv),
        "rows": args.rows,
        "threshold": det.threshold,
        "standardizer": {
            "mean": [float(v) for v in det.standardizer.mean],
            "std": [float(v) for v in det.standardizer.std],
            "clip": det.standardizer.clip,
        },
        "settings": dataclasses.asdict(det.settings),
        "sizes": det.model.sizes(),
    }
    prefix.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _print_json(
        {
            "tflite": str(prefix.with_suffix(".tflite")),
            "blob": str(prefix.with_suffix(".bin")),
            **meta["sizes"],
            "threshold": det.threshold,
        }
    )
    return 0


# --- virtual devices -----------------------------------------------------------------------


def command_virtual_plc(args: argparse.Namespace) -> int:
    from tools.virtual_plc.cli import command_virtual_plc as run

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
        help="output prefix: PREFIX.tflite, PREFIX.bin (firmware blob), PREFIX.json",
    )
    detector_flags(mt)
    mt.set_defaults(func=command_model_train)
    mv = mds.add_parser(
        "eval",
        help="evaluate the int8 pipeline with a benchmark's protocol (needs the train extra)",
    )
    mv.add_argument("--dataset", choices=["skab"], required=True)
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
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=command_model_parity)

    from tools.virtual_plc.cli import add_arguments as plc_arguments

    vd = sub.add_parser("virtual", help="virtual devices for tests, demos and HIL rigs")
    vds = vd.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    vp = vds.add_parser(
        "plc",
        help="a virtual PLC: the simulated pumps behind real Modbus TCP/RTU and OPC-UA servers",
        description="Serves the register map and address space of docs/virtual-plc.md; prints its endpoints as JSON.",
    )
    plc_arguments(vp)
    vp.set_defaults(func=command_virtual_plc)

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
