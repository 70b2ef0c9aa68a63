"""Why a model predicts what it does: class activation maps (Grad-CAM and kin) and feature maps.
"""
