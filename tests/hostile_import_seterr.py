"""Makes every floating-point warning an error as soon as it is imported."""

import numpy as np
from broken_impls import correct

np.seterr(all="raise")
dispatch_ffn_combine = correct
