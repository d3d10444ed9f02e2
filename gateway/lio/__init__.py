"""Declarative LIO configuration (``lio.toml`` + ``chap.toml``) and its reconciler.

:mod:`.config` parses and validates the configuration, :mod:`.state` is the
plain-data model of LIO objects and the sans-IO diff, :mod:`.rts` reads and
changes the kernel's configfs through rtslib-fb, :mod:`.reconcile` ties them
together (plan, apply, roll back).
"""

from .config import ConfigError, LioConfig, dump, load, save
from .reconcile import ApplyError, Change, PlanError, Reconciler

__all__ = ["ApplyError", "Change", "ConfigError", "LioConfig", "PlanError", "Reconciler",
           "dump", "load", "save"]
