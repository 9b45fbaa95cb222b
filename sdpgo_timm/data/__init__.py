from .digits import DigitsDataset
from .noise import apply_label_noise
from .fashion_mnist import FashionMNISTDataset
