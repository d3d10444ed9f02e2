"""The appliance tier: image recipe and build, QEMU runner, guest agent client.

Host-side tooling only (standard library, not part of the wheel): `appliance/build`
and `appliance/run` are its command lines, `tests/vm` its test harness.
"""
