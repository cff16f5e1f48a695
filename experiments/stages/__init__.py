"""The authors' five stages, one module each (the paper's order, see experiments/pipeline.py):

    start_weights       the weights stage 1 starts from (converted ImageNet weights, or "random")
    auxiliary_pretrain  stage 1: supervised training on the auxiliary data alone
    meta_train          stages 2 and 4: MetaFGNet meta-training (all auxiliary data / the selection)
    selection           stage 3: score every auxiliary image with stage 2's model, select
    finetune            stage 5: supervised fine-tuning on the target data, new target head
"""
