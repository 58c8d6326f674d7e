"""`cnncodes finetune`: the backbone trained end to end, or a small ConvNet from scratch, scored on the test set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import (
    BACKBONES,
    SPLIT_FRACTIONS,
    ClassWeightOpt,
    ResizeOpt,
    TrainableName,
    WeightsOpt,
    one_of,
    out_console,
    user_errors,
)
from cnncodes.core.choices import SMALL_CNN
from cnncodes.data.split import DEFAULT_DUP_THRESHOLD
from cnncodes.nets.backbones import DEFAULT_BACKBONE
from cnncodes.runs.report import rich_table


@command("finetune")
def finetune(
    data: Annotated[
        Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV with path,label columns.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .keras model and its .json run record.")],
    split_from: Annotated[Path | None, typer.Option(help="Features folder (or split.csv) whose split to use.")] = None,
    backbone: Annotated[
        TrainableName,
        typer.Option(
            parser=one_of(TrainableName),
            metavar="<name>",
            help=f"ImageNet network to fine-tune ({BACKBONES}), or {SMALL_CNN}: a small ConvNet from scratch "
            "(with --weights none).",
        ),
    ] = DEFAULT_BACKBONE,
    weights: WeightsOpt = "imagenet",
    image_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Square input size (default: the backbone's, 64 for smallcnn; 160 is a fast choice on a CPU).",
            show_default=False,
        ),
    ] = None,
    resize: ResizeOpt = "crop",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    head_epochs: Annotated[int, typer.Option(min=0, help="Epochs of phase 1: the head on the frozen backbone.")] = 5,
    fine_epochs: Annotated[
        int,
        typer.Option(min=0, help="Epochs of phase 2: the top block unfrozen (smallcnn: more epochs of its one phase)."),
    ] = 5,
    unfreeze: Annotated[
        str | None, typer.Option(help="Unfreeze the layers after this one, or the last N layers.")
    ] = None,
    head_lr: Annotated[float, typer.Option(help="Learning rate of phase 1 (smallcnn: its only one).")] = 1e-3,
    lr: Annotated[float, typer.Option(help="Learning rate of phase 2.")] = 1e-5,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="Dropout before the new softmax layer.")] = 0.2,
    augment: Annotated[
        bool | None,
        typer.Option(
            help="Random flips, rotations, zooms and contrast while training (default: on; off with --cache-trunk).",
            show_default=False,
        ),
    ] = None,
    cache_trunk: Annotated[
        bool,
        typer.Option(
            "--cache-trunk",
            help="Compute the frozen layers' activations once (kept in OUT/.trunk) and train only the top "
            "block and head on them: several times faster per epoch, no augmentation.",
        ),
    ] = False,
    class_weight: ClassWeightOpt = None,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without val-accuracy gain before stopping.")] = 3,
    init_seed: Annotated[int, typer.Option(help="Seed of the new layers' initialisation and of shuffling.")] = 0,
    name: Annotated[str | None, typer.Option(help="Prefix of the run name.")] = None,
    resume: Annotated[bool, typer.Option(help="Go on from the last finished epoch of an interrupted run.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard an interrupted run's checkpoints and start afresh.")] = False,
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Also train and score on K-1 more duplicate-aware splits of the "
            "--split-from features (mean ± sd in the record).",
        ),
    ] = 1,
    split: Annotated[
        str, typer.Option(help="train,val,test fractions of the split made without --split-from.")
    ] = SPLIT_FRACTIONS,
    seed: Annotated[
        int, typer.Option(help="Seed of the split's hash, for the split made without --split-from (as extract's).")
    ] = 0,
    dup_threshold: Annotated[
        int, typer.Option(help="Duplicate threshold of the split made without --split-from.")
    ] = DEFAULT_DUP_THRESHOLD,
    preview_augmentation: Annotated[
        Path | None,
        typer.Option(
            help="Write augmentation.png into this folder, what the training augmentation makes of a few images "
            "(a row each, from each class in turn: the image, then 6 random draws), and stop without training.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
) -> None:
    """Fine-tune the backbone end to end (head, then the top block) and score it on the same test set."""
    from cnncodes.finetuning.spec import make_spec
    from cnncodes.finetuning.train import finetune as run_finetune

    with user_errors("finished epochs are saved; add --resume to go on."):
        spec = make_spec(
            backbone,
            weights="none" if preview_augmentation else weights,  # the preview builds no network
            image_size=image_size,
            resize=resize,
            batch_size=batch_size,
            head_epochs=head_epochs,
            fine_epochs=fine_epochs,
            unfreeze=unfreeze,
            head_lr=head_lr,
            lr=lr,
            dropout=dropout,
            augment=augment,
            cache_trunk=cache_trunk,
            class_weight=class_weight,
            patience=patience,
            seed=init_seed,
        )
        if preview_augmentation:
            from cnncodes.finetuning.preview import preview_augmentation as write_preview

            out_console.print(Text(str(write_preview(data, preview_augmentation, spec))), soft_wrap=True)
            return
        record = run_finetune(
            data,
            out,
            spec,
            split_from=split_from,
            split=split,
            split_seed=seed,
            dup_threshold=dup_threshold,
            name=name,
            repeats=repeats,
            resume=resume,
            restart=restart,
            progress=not quiet,
        )
    if not quiet:
        title = f"{record['epochs_run']} epochs, {record['n_test']} test images"
        out_console.print(rich_table([record], title=title, width=out_console.width))
        kept = "" if record.get("val_score") is None else f" (validation accuracy {record['val_score']:.3f})"
        out_console.print(Text(f"{record['run']}{kept} -> {out / record['model_file']}"), soft_wrap=True)
