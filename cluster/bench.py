"""Placeholder replaced by the bench implementation (being written)."""
from __future__ import annotations
import argparse


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    pass


def run_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError
