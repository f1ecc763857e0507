"""The TorchServe handler of torchvision's DeepLabV3 models, as a package that the archive ships whole.

- ``handler``: the handler itself (TorchServe's ``handle(data, context)``), its batches and answers;
- ``images``: a request's image and parameters, to the pixels the model sees;
- ``engines``: what runs the model, and the locks by which workers share the cores;
- ``masks``: logits to the mask at the image's size (upsampling, threshold, bands), counts and PNG;
- ``catalog``: variants, engines and precisions, torch-free, for the archive builder too.

Nothing here runs on import: the gateway imports ``catalog`` without torch.
"""
