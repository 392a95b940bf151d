"""Object detection, instance segmentation and detect-then-classify.

Detectors are torchvision's (Faster R-CNN, RetinaNet, FCOS, Mask R-CNN) on a timm backbone with
a feature pyramid, trained as Tasks by the one trainer; data comes from COCO JSON, Pascal VOC
XML, CSV or a fine-grained benchmark's boxes (:mod:`finegrain.detect.readers`).
"""
