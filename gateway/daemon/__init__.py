"""gatewayd: one process hosting the TCMU handler, the key lookup service and the LIO
reconciler, with a control socket, Prometheus metrics and health (see README, "gatewayd")."""
