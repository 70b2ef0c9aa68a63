"""Running a trained model: any model file behind one call (backends), ensembles of models, the
images to predict and their loader, prediction rows, and speed.
"""
