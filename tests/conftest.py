import os

import torch

# the suite is sized for a 2-core CI machine; more threads than cores only adds contention
torch.set_num_threads(min(2, os.cpu_count() or 1))
