"""Print the graph after any pass as a table; optionally write it as GraphML or DOT.

    python -m scripts.dump_graph --dataset mnist --after convert
    python -m scripts.dump_graph --after quantize_add --graphml graph.graphml --dot graph.dot
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import networkx as nx
import torch
from tabulate import tabulate

import fxq
from fxq import dump
from scripts import data, models

PASS_NAMES = [p.__name__ for p in fxq.PASSES]


def graph_after(pass_name: str, dataset: str, calib_images: int) -> torch.fx.GraphModule:
    """The ResNet-18 of ``dataset`` after the passes up to and including ``pass_name``."""
    stop = PASS_NAMES.index(pass_name) + 1
    loader = data.calibration_batches(dataset, calib_images)
    return fxq.quantize(models.load_trained(dataset), loader, passes=fxq.PASSES[:stop])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=data.DATASETS, default="mnist")
    parser.add_argument("--after", choices=PASS_NAMES, default=PASS_NAMES[-1])
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--graphml", help="write the graph as GraphML to this path")
    parser.add_argument("--dot", help="write the graph as Graphviz DOT to this path")
    args = parser.parse_args(argv)
    gm = graph_after(args.after, args.dataset, args.calib_images)
    example = data.load(args.dataset, "test").images[:2]
    table = dump.rows(gm, example)
    print(f"{args.dataset} ResNet-18 after {args.after} ({len(table)} nodes)")
    print(tabulate([asdict(r) for r in table], headers="keys", tablefmt="github"))
    graph = dump.to_networkx(gm, table)
    if args.graphml:
        nx.write_graphml(graph, args.graphml)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(dump.to_dot(graph))


if __name__ == "__main__":
    main()
