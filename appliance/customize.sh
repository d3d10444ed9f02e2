#!/bin/bash
# mmdebstrap customize hook of the appliance image (see image.py).
# Usage: customize.sh ROOT   with EVLU_WHEELS (directory of the project's wheels)
# and EVLU_OVERLAY (appliance/rootfs) in the environment.
set -euo pipefail
root=${1:?usage: customize.sh ROOT}
: "${EVLU_WHEELS:?}" "${EVLU_OVERLAY:?}"
venv=/opt/evlu-gateway/venv
say() { printf '    [customize] %s\n' "$*"; }
# chroot with a clean environment: the build machine's PIP_*, LANG, ... stay outside
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

say "overlay: units, network, guest agent"
cp -a --no-preserve=ownership "$EVLU_OVERLAY/." "$root/"
echo evlu-appliance >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tevlu-appliance\n' >"$root/etc/hosts"
printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' >"$root/etc/fstab"
mkdir -p "$root/etc/target" "$root/opt/evlu-gateway/src"

say "venv $venv (system site packages for rtslib-fb), project wheels installed offline"
cp -r "$EVLU_WHEELS" "$root/tmp/evlu-wheels"
in_root python3 -m venv --system-site-packages "$venv"
in_root "$venv/bin/pip" install --quiet --no-index --no-cache-dir --ignore-installed \
  --find-links /tmp/evlu-wheels evlu-gateway
in_root "$venv/bin/pip" freeze --local >"$root/opt/evlu-gateway/requirements.lock"
rm -rf "$root/tmp/evlu-wheels"

say "units: enable ours and networkd; mask apt timers (no network) and disk maintenance"
in_root systemctl enable --quiet systemd-networkd.service evlu-lio-setup.service \
  evlu-agent.service evlu-dev-src.service evlu-kms.service evlu-gatewayd.service
in_root systemctl mask --quiet apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer
say "tcmu-runner masked (also its D-Bus activation): it would answer our devices' netlink events"
in_root systemctl mask --quiet tcmu-runner.service
