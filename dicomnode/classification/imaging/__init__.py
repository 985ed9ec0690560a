"""Reading CT: decoding pixels to HU in display orientation, grouping and ordering series, preprocessing."""
