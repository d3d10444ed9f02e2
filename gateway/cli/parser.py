"""The ``evlu`` command line: every command, its options and help (argparse only).

A command's ``func`` names the function that runs it ("module:function" in this
package); :func:`gateway.cli.main.execute` imports it then, so ``evlu --help``
and the quick commands (``evlu lun list``) do not load numpy, PyKMIP or rtslib.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import __version__
from ..daemon.client import default_socket
from .errors import EXIT_CODES_HELP
from .sizes import parse_size

# Defaults owned by heavier modules, repeated so that parsing stays cheap
# (tests/test_cli.py checks that they match): gateway.format, gateway.kms.cache
# and gateway.lio.boot.
DEFAULT_DATA_OFFSET, MIN_DATA_OFFSET = 16 << 20, 1040 << 10
DEFAULT_TTL = 24 * 3600.0
RTSLIB_SAVECONFIG = "/etc/rtslib-fb-target/saveconfig.json"


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common() -> argparse.ArgumentParser:
    """Options every command takes: where the configuration is, who this gateway is."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("KMS options")
    group.add_argument("--config-dir", metavar="DIR",
                       help="configuration directory (default: $EVLU_CONFIG_DIR or "
                            "/etc/evlu-gateway)")
    group.add_argument("--gateway", metavar="NAME",
                       help="enrolled gateway identity to act as (default: $EVLU_GATEWAY, "
                            "else the configured default, else this host's name)")
    group.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for the KMS (default: %(default)s)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evlu", description="Manage encrypted virtual LUNs (LUKS2-compatible eVLUs).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"evlu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common()

    def add(name: str, func: str, help_text: str,
            device: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if device:
            p.add_argument("device", metavar="DEVICE", help="backing file or block device")
        p.set_defaults(func=f"volume_cmds:{func}")
        return p

    def kek(p: argparse.ArgumentParser, flag: str = "--kek-file", what: str = "KEK") -> None:
        p.add_argument(flag, metavar="FILE",
                       help=f"file holding the {what} (raw bytes, as cryptsetup --key-file); "
                            "offline use: without it the KMS is asked")

    p = add("format", "cmd_format", "Create an eVLU: random DEK wrapped under a KEK the KMS "
                                    "provisions (or --kek-file), bound to its key id.")
    kek(p)
    p.add_argument("--key-id", help="with --kek-file: the key id to record (default: local-UUID)")
    p.add_argument("--kms", nargs="?", const="", metavar="PROFILE",
                   help="KMS profile to provision the KEK in (default: the default profile); "
                        "with --kek-file: the profile name to record")
    p.add_argument("--sector-size", type=int, choices=(512, 4096), default=512,
                   help="encryption sector = LUN block size (default: %(default)s)")
    p.add_argument("--data-offset", type=_size_arg, default=DEFAULT_DATA_OFFSET,
                   help=f"start of the data area, e.g. 16M (default 16 MiB, minimum "
                        f"{MIN_DATA_OFFSET // 1024} KiB)")
    p.add_argument("--label", default="", help="LUKS2 label")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing LUKS header (destroys what it protects)")
    p.add_argument("--yes", action="store_true", help="do not ask before overwriting data")
    p.add_argument("--no-wipe", action="store_true",
                   help="do not zero the data area (old data stays on the medium, unreadable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress meter")

    p = add("dump", "cmd_dump", "Show the header: copies, segment, keyslots, bindings.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("check", "cmd_check", "Verify both header copies (exit 5 if one needs repair).")
    p.add_argument("--repair", action="store_true", help="rewrite a damaged or stale copy")

    p = add("unlock-check", "cmd_unlock_check",
            "Exit 0 only if this gateway can unlock the volume (through the KMS, or --kek-file); "
            "otherwise say why.")
    kek(p)
    p.add_argument("--key-id", help="only try the binding with this key id")
    p.add_argument("--kms", metavar="PROFILE", dest="lookup_kms",
                   help="look the key up in this KMS profile instead of the one the binding "
                        "names")

    p = add("copy-in", "cmd_copy_in", "Stream plaintext from SRC into the volume (from block 0).",
            device=False)
    p.add_argument("src", metavar="SRC", help="source file or block device ('-' = stdin)")
    p.add_argument("device", metavar="DEVICE", help="eVLU backing file or block device")
    kek(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress meter")

    p = add("copy-out", "cmd_copy_out", "Stream the volume's plaintext to DEST.")
    p.add_argument("dest", metavar="DEST", help="destination file ('-' = stdout)")
    kek(p)
    p.add_argument("--length", type=_size_arg, help="bytes to copy (default: the whole volume)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress meter")

    p = add("rotate", "cmd_rotate", "Re-wrap the DEK under a new KEK (no data rewrite); with the "
                                    "KMS the new KEK is provisioned and the old one deactivated.")
    kek(p, what="current KEK")
    kek(p, "--new-kek-file", "new KEK")
    p.add_argument("--key-id", help="binding to rotate (default: the one that unlocks)")
    p.add_argument("--new-key-id", help="with --new-kek-file: key id of the new KEK")
    p.add_argument("--kms", metavar="PROFILE",
                   help="KMS profile of the new KEK (default: the old binding's)")

    p = add("bind", "cmd_bind", "Add a binding to a second KEK, e.g. in a DR site's KMS.")
    kek(p, what="current KEK")
    kek(p, "--new-kek-file", "additional KEK")
    p.add_argument("--new-key-id", help="with --new-kek-file: key id of the additional KEK")
    p.add_argument("--kms", metavar="PROFILE",
                   help="KMS profile of the additional KEK (required with the KMS)")

    p = add("unbind", "cmd_unbind", "Remove one binding (never the last one).")
    p.add_argument("--key-id", required=True, help="key id of the binding to remove")

    p = add("shred", "cmd_shred", "Destroy the volume's KEK(s) in the KMS: the volume and every "
                                  "replica of it become unreadable everywhere.")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = add("off", "cmd_off", "Remove encryption: all bindings and the header (data is lost).")
    p.add_argument("--confirm", action="store_true", help="required: yes, destroy the data")

    for group in (_kms, _tcmu, _daemon, _lio):
        group(sub, common)
    return parser


def _kms(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu kms`` and its subcommands."""
    kms = sub.add_parser("kms", help="Key manager: embedded server, enrollment, profiles, cache.",
                         description="Key manager: embedded KMIP server, gateway enrollment, "
                                     "KMS profiles, the local key cache, health.")
    ksub = kms.add_subparsers(dest="kms_command", metavar="SUBCOMMAND", required=True)

    def add(parent: Any, name: str, func: str, text: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text, description=text, parents=[common])
        p.set_defaults(func=f"kms_cmds:{func}")
        return p

    p = add(ksub, "init", "cmd_init", "Create the embedded key server: CA, server certificate, "
                                      "PyKMIP configuration and the perimeter policy.")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on and put in the certificate (default: %(default)s)")
    p.add_argument("--port", type=int, default=5696, help="KMIP port (default: %(default)s)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP the server is reached by (repeatable)")

    p = add(ksub, "serve", "cmd_serve", "Run the embedded key server in the foreground "
                                        "(SIGTERM/SIGINT stop it cleanly).")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="PyKMIP log level (default: %(default)s)")

    p = add(ksub, "enroll", "cmd_enroll", "Issue a gateway identity (certificate + 0600 key) "
                                          "and write the embedded client profile.")
    p.add_argument("name", metavar="NAME", help="gateway name (the certificate's CN)")
    p.add_argument("--default", action="store_true",
                   help="make it this host's default identity (the first enrolled one is)")

    p = add(ksub, "status", "cmd_status", "Check that each KMS profile answers this gateway "
                                          "(exit 8 if one does not).")
    p.add_argument("--kms", metavar="PROFILE", help="only this profile")

    prof = ksub.add_parser("profile", help="Manage KMS profiles.",
                           description="Manage KMS profiles (any KMIP 1.x/2.x server).")
    psub = prof.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    p = add(psub, "add", "cmd_profile_add", "Add or replace a KMS profile.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--address", action="append", required=True, metavar="HOST[:PORT]",
                   help="KMS address; repeat for failover, in order")
    p.add_argument("--ca", required=True, metavar="FILE", help="CA certificate(s) of the KMS")
    p.add_argument("--cert", metavar="FILE", help="client certificate (default: the gateway's)")
    p.add_argument("--key", metavar="FILE", help="client key (default: the gateway's)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default: %(default)s)")
    p.add_argument("--default", action="store_true", help="make it the default profile")
    add(psub, "list", "cmd_profile_list", "List KMS profiles (* = default).")
    p = add(psub, "remove", "cmd_profile_remove", "Remove a KMS profile.")
    p.add_argument("name", metavar="NAME")
    p = add(psub, "default", "cmd_profile_default", "Set the default KMS profile.")
    p.add_argument("name", metavar="NAME")

    p = add(ksub, "cache", "cmd_cache", "Turn the local key cache on or off (off by default): "
                                        "KEKs kept wrapped under a host key, for KMS outages.")
    p.add_argument("action", choices=("on", "off", "status"))
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL,
                   help="seconds a cached KEK stays usable (default: %(default)g)")
    p.add_argument("--host-key-file", metavar="FILE",
                   help="32-byte host key to wrap cached KEKs with (default: one made on first "
                        "use, 0600)")


def _tcmu(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu tcmu`` and its subcommands."""
    tcmu = sub.add_parser("tcmu", help="The user:evlu TCMU handler (LIO backstores).",
                          description="The user:evlu TCMU handler that serves LIO backstores "
                                      "from eVLUs.")
    tsub = tcmu.add_subparsers(dest="tcmu_command", metavar="SUBCOMMAND", required=True)
    p = tsub.add_parser("serve", parents=[common], help="Serve every user:evlu device "
                        "(foreground; SIGTERM stops it).",
                        description="Serve every user:evlu device of this host: existing ones "
                                    "and those created later (netlink), with keys from the KMS.")
    p.add_argument("--workers", type=int, default=4, help="I/O threads per device "
                                                          "(default: %(default)s)")
    p.add_argument("--pin-devices", action="store_true",
                   help="run all of a device's threads on one CPU, devices spread over "
                        "the CPUs (cheaper small I/O, slower large encrypted I/O)")
    p.add_argument("--dbus", choices=("standalone", "beside-runner", "off"), default="standalone",
                   help="how targetcli finds the handler: own org.kernel.TCMUService1 "
                        "(standalone), register with tcmu-runner (beside-runner: use it "
                        "whenever tcmu-runner runs), or no D-Bus (default: %(default)s)")
    p.set_defaults(func="tcmu_cmds:cmd_serve")
    p = tsub.add_parser("check", parents=[common], help="Say whether a user:evlu "
                        "configuration string can be served (targetcli's CheckConfig).")
    p.add_argument("config", metavar="PATH[;plain]")
    p.set_defaults(func="tcmu_cmds:cmd_check")


def _daemon(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu daemon``, ``evlu lun`` and ``evlu rescan``."""
    client = argparse.ArgumentParser(add_help=False)
    group = client.add_argument_group("gatewayd options")
    group.add_argument("--socket", type=Path, default=default_socket(), metavar="PATH",
                       help="gatewayd's control socket (default: $EVLU_GATEWAYD_SOCKET or "
                            "%(default)s)")
    group.add_argument("--json", action="store_true", help="print gatewayd's JSON answer")

    daemon = sub.add_parser("daemon", help="gatewayd: status.", description="gatewayd, the "
                            "gateway daemon (systemctl start evlu-gatewayd).")
    dsub = daemon.add_subparsers(dest="daemon_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser("status", parents=[client], help="Health, LUNs, KMS, LIO (exit 1 "
                        "when not ready).")
    p.set_defaults(func="daemon_cmds:cmd_status")

    lun = sub.add_parser("lun", help="LUNs served by gatewayd.",
                         description="LUNs served by gatewayd.")
    lsub = lun.add_subparsers(dest="lun_command", metavar="SUBCOMMAND", required=True)
    p = lsub.add_parser("list", parents=[client], help="Every LUN, its state and size.")
    p.set_defaults(func="daemon_cmds:cmd_lun_list")
    p = lsub.add_parser("info", parents=[client], help="One LUN (by name or path).")
    p.add_argument("lun", metavar="NAME|PATH")
    p.set_defaults(func="daemon_cmds:cmd_lun_info")
    p = lsub.add_parser("add", parents=[client], help="Serve a backing store: its header is "
                        "read and its key looked up (any replica, snapshot or copy); exit 8/9 "
                        "when the key stays unavailable/refused.")
    p.add_argument("path", metavar="PATH", help="backing file or block device")
    p.add_argument("--target", metavar="IQN", help="target to export it under (default: the "
                   "LIO configuration's default)")
    p.add_argument("--name", help="LUN name (default: from the file name)")
    p.add_argument("--plain", action="store_true",
                   help="serve a store without an eVLU header unencrypted")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the key (default: %(default)s)")
    p.set_defaults(func="daemon_cmds:cmd_lun_add")

    p = sub.add_parser("rescan", parents=[client], help="Re-read LUN metadata (all, or one).",
                       description="Re-read the metadata of every LUN, or of one, through "
                                   "gatewayd; changes raise unit attentions.")
    p.add_argument("lun", metavar="NAME|PATH", nargs="?")
    p.add_argument("--accept-plain", action="store_true",
                   help="serve an encrypted LUN whose header vanished as plain")
    p.set_defaults(func="daemon_cmds:cmd_rescan")


def _lio(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu lio`` and its subcommands."""
    lio = sub.add_parser("lio", help="The declarative LIO configuration (lio.toml).",
                         description="Targets, TPGs, portals, user:evlu LUNs, ACLs and CHAP "
                                     "as declared in lio.toml (secrets in chap.toml), applied "
                                     "to the kernel target idempotently.")
    lsub = lio.add_subparsers(dest="lio_command", metavar="SUBCOMMAND", required=True)
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--config", metavar="FILE",
                       help="the LIO configuration (default: CONFIG_DIR/lio.toml)")
    files.add_argument("--secrets", metavar="FILE",
                       help="the CHAP secrets, mode 0600 (default: chap.toml beside --config)")
    for name, func, text in (
            ("check", "cmd_check", "Validate the configuration (exit 2 listing every problem)."),
            ("plan", "cmd_plan", "Show what 'apply' would change in LIO (changes nothing)."),
            ("apply", "cmd_apply", "Make LIO match the configuration; a failed apply is rolled "
                                   "back. Running it again changes nothing.")):
        p = lsub.add_parser(name, parents=[common, files], help=text, description=text)
        p.set_defaults(func=f"lio_cmds:{func}")
    text = ("At boot, instead of 'targetctl restore': restore rtslib's saved configuration "
            "without the gateway's objects, then apply the configuration.")
    p = lsub.add_parser("boot", parents=[common, files], help=text, description=text)
    p.add_argument("--saveconfig", metavar="FILE", default=RTSLIB_SAVECONFIG,
                   help="rtslib's saved configuration (default: %(default)s)")
    p.set_defaults(func="lio_cmds:cmd_boot")
