"""Pictures: matplotlib figures (curves, confusion matrix, reliability, galleries, t-SNE) and images
with text drawn on them (batch grids, labelled predictions), with the fonts they use.
"""
