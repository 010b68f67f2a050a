"""Adapters that put pyprune_fast behind other pruning libraries' APIs."""
