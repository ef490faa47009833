"""fashion_mnist at 28x28: the mnist setting on the other dataset."""

from jaxdiff.configs import mnist


def get_config():
    config = mnist.get_config()
    config.data.dataset = "fashion_mnist"
    return config
