"""pretrain_vlm with the save of iteration 2 killed half-way through writing a rank file (as a node failure
would), to check that the previous checkpoint stays the latest and loadable."""
import os

if __name__ == "__main__":
    from mindspeed_mm.training import checkpointing
    from mindspeed_mm.training.train import main

    real_save = checkpointing.save_rank_object

    def dying_save(path, obj):
        if obj.get("iteration") == 2:
            real_save(path, obj)
            with open(path, "r+b") as f:  # a torn write
                f.truncate(os.path.getsize(path) // 2)
            os._exit(17)
        return real_save(path, obj)

    checkpointing.save_rank_object = dying_save
    main()
