"""Short real English passages for calibration and evaluation in tests."""

TEXTS = [
    "The weights of a neural network are the numbers it learned during training on data.",
    "Quantization stores each weight with fewer bits, and a scale per group of columns.",
    "A river runs past the old mill, where the miller counts sacks of grain every morning.",
    "Calibration text flows through the layers so that the rounding error can be corrected.",
    "She opened the window and the cold air of the mountain filled the small wooden room.",
    "Merging models combines what several fine-tunes learned into a single set of weights.",
    "The committee met on Tuesday to discuss the budget, the roads and the new library.",
    "Every block of the transformer has attention, a feed-forward network and two norms.",
] * 4
