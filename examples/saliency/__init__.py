"""Saliency maps with a merged DINOv2 backbone: an example application of dsm-lightning (see ``app.py``)."""
