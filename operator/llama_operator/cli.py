"""The `llama-operator` command line: run, crds, render (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import CliError


def _cmd_version(_: argparse.Namespace) -> int:
    from . import __version__
    from .llamacpp import LLAMA_CPP_BUILD

    print(f"llama-operator {__version__} (llama.cpp {LLAMA_CPP_BUILD})")
    return 0


def _cmd_crds(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .api.crd import CRD_FILES, all_crds, conversion_client_config, to_yaml, with_webhook_conversion

    client_config = None
    if args.conversion_service or args.conversion_url:
        if not args.ca_bundle:
            raise CliError("--conversion-service/--conversion-url need --ca-bundle (the webhook's CA, PEM)")
        try:
            client_config = conversion_client_config(ca_pem=Path(args.ca_bundle).read_bytes(),
                                                     service=args.conversion_service, url=args.conversion_url)
        except (OSError, ValueError) as exc:
            raise CliError(f"crds: {exc}") from None
    if args.out_dir:
        for file_name, build in CRD_FILES.items():
            crd = build() if client_config is None else with_webhook_conversion(build(), client_config)
            (Path(args.out_dir) / file_name).write_text(to_yaml(crd))
        return 0
    sys.stdout.write("---\n".join(to_yaml(crd) for crd in all_crds(client_config)))
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from .config import Settings
    from .render import RenderError, render

    try:
        objects = render(args.files, Settings.from_env(), default_namespace=args.namespace)
    except RenderError as exc:
        raise CliError(str(exc)) from None
    sys.stdout.write("---\n".join(yaml.safe_dump(obj, sort_keys=False) for obj in objects))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)
    from .config import Settings, SettingsError
    from .leader import ElectionConfig, ElectionSettingsError
    from .leadership import PauseHookError, install_pause_hook

    try:
        settings = Settings.from_env()
        election = ElectionConfig.from_env()
    except (SettingsError, ElectionSettingsError) as exc:
        raise CliError(str(exc)) from None
    if election is not None:
        # Before kopf.run: its watchers must start paused, or a standby would list and write for a moment.
        try:
            install_pause_hook()
        except PauseHookError as exc:
            raise CliError(str(exc)) from None
    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format)
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=args.liveness,
    )
    return 0


# The subcommands other modules register, and the module of each. Only the named one is imported when a command
# names it: the fetcher (every model pod's init container) then starts without the API models, the flag catalog
# and httpx that validate-args and inspect import (about 0.5 s of CPU per start).
REGISTERED = {
    "validate-args": "llama_operator.flags.cli",
    "fetch": "llama_operator.fetch",
    "inspect": "llama_operator.inspect_cli",
    "sandbox": "llama_operator.sandbox",
    "gateway": "llama_operator.gateway",
    "drain": "llama_operator.drain",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `command` (one of REGISTERED) only the subcommands that cost no import."""
    parser = argparse.ArgumentParser(prog="llama-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions (YAML stream)")
    crds.add_argument("--out-dir", help="write one file per CRD into this directory instead")
    crds.add_argument("--conversion-service", metavar="NAMESPACE/NAME",
                      help="convert v1alpha1 <-> v1beta1 through the operator's webhook behind this Service "
                      "(port 443, path /convert); without it the CRDs have no conversion webhook (docs/api.md)")
    crds.add_argument("--conversion-url", metavar="URL", help="the same, at this https URL (path /convert added)")
    crds.add_argument("--ca-bundle", metavar="FILE", help="PEM of the CA that signed the webhook's certificate")
    crds.set_defaults(func=_cmd_crds)

    render = sub.add_parser("render", help="print the objects the operator would create for YAML files (offline)")
    render.add_argument("-f", "--filename", dest="files", action="append", required=True,
                        help="a YAML file with LlamaModel/LlamaServer objects (repeatable)")
    render.add_argument("-n", "--namespace", default="default", help="namespace for objects that name none")
    render.set_defaults(func=_cmd_render)

    version = sub.add_parser("version", help="print this release and the llama.cpp build it is pinned to")
    version.set_defaults(func=_cmd_version)

    run = sub.add_parser("run", help="run the operator against the current kubeconfig or in-cluster config")
    run.add_argument("--liveness", metavar="URL", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_cmd_run)
    for name, module in REGISTERED.items():
        if command in (None, name):
            __import__(module, fromlist=["register"]).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments[0] if arguments and arguments[0] in REGISTERED else None)
    args = parser.parse_args(arguments)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"llama-operator {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
