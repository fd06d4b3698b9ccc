"""Small files shipped with keepbits (together under 20 MB):

* ``lite0_nice_bundle.zip``: the demo model, EfficientNet-Lite0 (ImageNet-1k, float32) with a NICE
  ``nice_fast`` mask generator trained on unlabelled images and video frames (``docs/real_models.md``);
* ``bottle_clip.mp4``: frames 400-549 of ``bottle-detection.mp4`` from the Intel IoT DevKit sample
  videos, CC-BY 4.0 (``LICENSE-CC-BY-4.0``), re-encoded by OpenCV (MPEG-4 Part 2);
* ``imagenet_classes.json``: index, wnid and name of the 1,000 ImageNet classes;
* ``mnist_sample.npz``: 2,000 train / 500 test MNIST digits (tests, examples);
* ``density_cifar10.pt``: the CIFAR-10 Glow of SimpleBits' L_sim.
"""
