"""Running a trained model: any model file behind one call through the format table (backends),
ensembles of models (ensemble), what --source names (sources), the images to predict and their
loader (loader), prediction rows and where they go (rows), and speed (speed).
"""
