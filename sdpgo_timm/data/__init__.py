from .digits import DigitsDataset
from .noise import apply_label_noise
