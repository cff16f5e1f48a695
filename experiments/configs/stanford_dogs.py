"""MetaFGNet on Stanford Dogs (120 classes) with ImageNet as auxiliary data, same code as CUB.

    python -m experiments.cub_200 --workdir runs/dogs --config experiments/configs/stanford_dogs.py \
        --config.init_checkpoint=ckpt/imagenet34

Needs images.tar, annotation.tar, lists.tar (Stanford Dogs) and ILSVRC2012_img_train.tar in
the TFDS manual directory. Paper: 96.7% top-1 (ResNet-34). Stanford Dogs' images are a
subset of ImageNet's train split: a faithful protocol removes them from the auxiliary set
(the paper does not say whether it did); this config does not.

The authors shipped no Stanford Dogs script. Where the CUB config's numbers come from a
stage's run.sh, the numbers here are derived from them the way they relate to the auxiliary
set's size (N = 1,281,167 ImageNet train images, batch 256):

- stage 1 is skipped: the ImageNet ResNet-34 is already trained on the auxiliary data alone,
  with its own 1000-way classifier, which the authors' code loaded as the auxiliary head when
  the auxiliary data were ImageNet (models/resnet.py); so only the target head is new;
- stage 2: CUB's 37,263 iterations are 3 passes over L-Bird (3 x 3.18 M / 256), decayed after
  1/3 and 2/3 of them, evaluated every 1/6: 3 N / 256 = 15,014 iterations, milestones 5,005
  and 10,009, evaluation every 2,502;
- stage 4: CUB's 100,540 iterations are ~10 passes over the 2.54 M selected images, decayed
  after 1/2 and 3/4, evaluated every ~1/20: 10 x 0.8 N / 256 = 40,037 iterations, milestones
  20,018 and 30,028, evaluation every 2,002;
- stage 5: the fine-tuning script's own settings (its data code reads Stanford Dogs' split
  files, so the same run.sh values applied): unchanged from the CUB config.
"""

from experiments.configs import cub_200


def get_config():
    config = cub_200.get_config()
    config.dataset = "stanford_dogs"
    config.auxiliary.name = "imagenet2012"
    config.auxiliary.folder = ""
    config.init_new_heads = ("target_head",)  # keep ImageNet's classifier as the auxiliary head
    config.auxiliary_pretrain.epochs = 0
    config.meta_train.steps = 15014
    config.meta_train.milestones = (5005, 10009)
    config.meta_train.eval_every = 2502
    config.meta_train_selected.steps = 40037
    config.meta_train_selected.milestones = (20018, 30028)
    config.meta_train_selected.eval_every = 2002
    return config
