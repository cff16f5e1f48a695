"""MetaFGNet on Stanford Dogs (120 classes) with ImageNet as auxiliary data, same code as CUB.

    python -m experiments.cub_200 --workdir runs/dogs --config experiments/configs/stanford_dogs.py \
        --config.init_checkpoint=ckpt/imagenet34

Needs images.tar, annotation.tar, lists.tar (Stanford Dogs) and ILSVRC2012_img_train.tar in
the TFDS manual directory. Paper: 96.7% top-1 (ResNet-34). Stanford Dogs' images are a
subset of ImageNet's train split: a faithful protocol removes them from the auxiliary set
(the paper does not say whether it did); this config does not.
"""

from experiments.configs import cub_200


def get_config():
    config = cub_200.get_config()
    config.dataset = "stanford_dogs"
    config.auxiliary.name = "imagenet2012"
    config.auxiliary.folder = ""
    # ImageNet has 1.28 M images: three passes at batch 256 as for L-Bird would be ~15,000
    # steps; keep the authors' schedule shape.
    config.meta_train.steps = 15000
    config.meta_train.milestones = (10000, 13000)
    config.meta_train_selected.steps = 15000
    config.meta_train_selected.milestones = (10000, 13000)
    return config
