"""The shapes-world upscaler: Real-ESRGAN's recipe scaled down to 32 -> 128 px (``raphael-train-upscaler``).

    raphael-train-upscaler --config configs/upscaler/sr_shapes.py --workdir runs/sr_shapes
    raphael-eval upscale --weights runs/sr_shapes/generator.safetensors --seed 1234

The paper's upscaler (App. 7.8) follows Real-ESRGAN (Wang et al., 2021): an RRDBNet generator first
trained with L1 alone (Real-ESRNet), then with L1 + perceptual + GAN losses against a U-Net
discriminator with spectral normalisation, on pairs made by the high-order degradation model
(``raphael_jax/data/degrade.py``). What is scaled down here, for the 2-core CPU (docs/RESULTS.md):
the generator (4 RRDBs of 32 features instead of 23 of 64), the discriminator (32 features instead
of 64), the images (128 px shapes-world scenes, 32 px inputs; the original crops 256 px patches), the
schedule (steps, not 1M + 400k iterations) and the perceptual network: no pretrained VGG19 can be
downloaded here, so ``loss.perceptual_net="random:4"`` is a frozen He-initialised VGG19 of a quarter
width (an explicit stand-in; give ``vgg19:PATH`` for torchvision's weights, docs/CONVERT.md).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(scale=4, num_feat=32, num_block=4, num_grow_ch=16))
    c.disc = ml_collections.ConfigDict(dict(num_feat=32, skip_connection=True))
    c.data = ml_collections.ConfigDict(dict(
        hr_size=128,            # HR image side; the input side is hr_size / model.scale
        min_objects=1, max_objects=3,
        seed=0,                 # training scenes: shapes world stream 0
        degradation="realesrgan",  # the high-order degradation (data/degrade.py), or "clean" (bicubic down)
    ))
    c.loss = ml_collections.ConfigDict(dict(
        l1=1.0, perceptual=1.0, gan=0.1,  # Real-ESRGAN's weights
        perceptual_net="random:4",         # "vgg19:PATH[:DIVISOR]", "random:DIVISOR" or "none"
    ))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=1200,
        pixel_steps=1000,       # the first steps train with L1 alone (Real-ESRNet), then the GAN losses join
        batch_size=8,
        lr_g=2e-4,              # Real-ESRNet 2e-4; the GAN stage uses lr_g / 2 as Real-ESRGAN (1e-4)
        lr_d=1e-4,
        ema=0.999,
        seed=0,
        init_from="",           # an RRDBNet safetensors to start from (raphael-convert esrgan, or a run's generator)
        log_every=50,
        checkpoint_every=200,
        max_to_keep=2,
    ))
    c.eval = ml_collections.ConfigDict(dict(seed=99, num=32))  # validation scenes (stream 1) logged while training
    return c
