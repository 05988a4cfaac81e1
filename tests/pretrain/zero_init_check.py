"""Run on 2 ranks: the model built under ZeRO-3 (engine.partitioned_construction) against the same model built
whole, from the same seed. Prints one JSON line per rank with what the test asserts on."""
import json
import os
import sys

import torch

from ssmforge.models import LanguageModel
from ssmforge.pretrain.config import load_config
from ssmforge.pretrain.engine import param_groups, parameter_count, partitioned_construction
from ssmforge.pretrain.launch import init_distributed, shutdown


def main() -> None:
    import deepspeed

    config = load_config(sys.argv[1], sys.argv[2:] + ["run_dir=unused", "deepspeed.zero_stage=3"])
    world, _ = init_distributed()
    torch.manual_seed(config.seed)
    whole = LanguageModel(config.model)
    torch.manual_seed(config.seed)
    with partitioned_construction(config, world.world_size):
        parted = LanguageModel(config.model)
    local = sum(p.numel() for p in parted.parameters())
    held = sum(p.ds_tensor.numel() for p in parted.parameters())
    names = {id(p): n for n, p in parted.named_parameters()}
    decayed = sorted(names[id(p)] for p in param_groups(parted, 0.1, 1e-3)[0]["params"])
    whole_names = {id(p): n for n, p in whole.named_parameters()}
    whole_decayed = sorted(whole_names[id(p)] for p in param_groups(whole, 0.1, 1e-3)[0]["params"])
    equal = True
    for (name, a), b in zip(parted.named_parameters(), whole.parameters()):
        with deepspeed.zero.GatheredParameters([a]):
            equal &= torch.equal(a.data, b.data)
    print(json.dumps(dict(rank=world.rank, total=parameter_count(parted), whole=whole.num_parameters(),
                          local_numel=local, held=held, equal=bool(equal), same_decay=decayed == whole_decayed,
                          decayed=len(decayed))), flush=True)
    torch.distributed.barrier()  # both ranks done with their collectives before the group goes
    shutdown()


if __name__ == "__main__":
    main()
    # the gathers above leave gloo work objects that, in about one exit in ten, abort in the interpreter's
    # teardown (std::terminate in a thread destructor); what this script checks is done, so skip that teardown
    sys.stdout.flush()
    os._exit(0)
