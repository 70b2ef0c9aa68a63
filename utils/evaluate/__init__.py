"""Scoring a model on a labelled split: predictions of a split, metrics, what metrice.py writes,
and classical classifiers on the network's features.
"""
