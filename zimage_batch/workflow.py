"""Finding the inputs to patch in an API-format workflow by what the nodes are, never by their ids.

Node ids change whenever someone edits and re-exports a workflow; the graph's shape does not: one sampler,
its positive and negative inputs lead back to text encoders, its latent_image to an empty-latent node, and
SaveImage nodes write the files.
"""
from __future__ import annotations

import copy
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .jobs import Job

SEED_INPUT = {"ZImageTurboSampler": "seed", "KSampler": "seed", "KSamplerAdvanced": "noise_seed"}
TEXT_ENCODERS = {"CLIPTextEncode"}
SIZED_LATENTS = {"EmptyLatentImage", "EmptySD3LatentImage"}
PRESET_LATENT = "ZImageTurboSize"      # aspect + base presets; its aspect "custom" takes an exact width/height
CUSTOM_ASPECT = "custom"


class WorkflowError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    workflow: dict
    sampler: str
    positive: str
    negative: str | None
    latent: str | None
    savers: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        try:
            workflow = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise WorkflowError(f"{path}: cannot read the workflow: {e}") from e
        return cls.from_workflow(workflow, str(path))

    @classmethod
    def from_workflow(cls, workflow: dict, name: str = "workflow") -> "Template":
        if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
            raise WorkflowError(f"{name} is in the canvas format; the API needs the API format "
                                f"(ComfyUI: Workflow > Export (API), or this pack's workflows/*_api.json)")
        if not isinstance(workflow, dict) or not all(
                isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict)
                for n in workflow.values()):
            raise WorkflowError(f"{name} is not an API-format workflow (node id -> {{class_type, inputs}})")
        samplers = sorted(i for i, n in workflow.items() if n["class_type"] in SEED_INPUT)
        if len(samplers) != 1:
            found = f"{len(samplers)} ({', '.join(samplers)})" if samplers else "none"
            raise WorkflowError(f"{name}: the batch client needs exactly one sampler node "
                                f"({', '.join(SEED_INPUT)}); found {found}")
        sampler = samplers[0]
        inputs = workflow[sampler]["inputs"]
        positive = upstream(workflow, inputs.get("positive"), TEXT_ENCODERS)
        if positive is None:
            raise WorkflowError(f"{name}: the sampler's positive input does not come from a CLIPTextEncode node")
        negative = upstream(workflow, inputs.get("negative"), TEXT_ENCODERS)
        if negative == positive:                        # e.g. ConditioningZeroOut(positive): there is no own text
            negative = None
        link = inputs.get("latent_image")
        latent = str(link[0]) if is_link(link) else None
        if latent is not None and workflow.get(latent, {}).get("class_type") not in SIZED_LATENTS | {PRESET_LATENT}:
            latent = None                               # image-to-image and the like: size comes from the input
        savers = tuple(sorted(i for i, n in workflow.items() if "filename_prefix" in n["inputs"]))
        if not savers:
            raise WorkflowError(f"{name}: no save node (SaveImage, ZImageTurboSaveImage: a node with a "
                                f"filename_prefix), so no image would be written for the client to fetch")
        return cls(workflow, sampler, positive, negative, latent, savers)

    def check(self, job: Job) -> str | None:
        """Why this job cannot run on this template, or None: so misfits are found before anything is sent."""
        if job.negative is not None and self.negative is None:
            return (f"{job.where}, column 'negative': the workflow has no negative CLIPTextEncode on the "
                    f"sampler to put it in")
        sizing = job.width is not None or job.count != 1
        if sizing and self.latent is None:
            return (f"{job.where}, columns 'width'/'height'/'count': the sampler's latent_image does not come "
                    f"from {', '.join(sorted(SIZED_LATENTS | {PRESET_LATENT}))}, so there is no size to set")
        return None

    @property
    def patched_nodes(self) -> list[str]:
        return [self.sampler] + ([self.latent] if self.latent else [])

    def apply(self, job: Job) -> tuple[dict, dict]:
        """The workflow for this job, and the values it will run with (for the log)."""
        problem = self.check(job)
        if problem:
            raise WorkflowError(problem)
        wf = copy.deepcopy(self.workflow)
        sampler = wf[self.sampler]["inputs"]
        seed_key = SEED_INPUT[wf[self.sampler]["class_type"]]
        wf[self.positive]["inputs"]["text"] = job.prompt
        if job.negative is not None:
            wf[self.negative]["inputs"]["text"] = job.negative
        for key, value in ((seed_key, job.seed), ("steps", job.steps), ("cfg", job.cfg)):
            if value is not None:
                sampler[key] = value
        width = height = None
        if self.latent is not None:
            latent = wf[self.latent]
            if job.width is not None:
                latent["inputs"].update(width=job.width, height=job.height)
                if latent["class_type"] == PRESET_LATENT:
                    latent["inputs"]["aspect"] = CUSTOM_ASPECT
            preset = latent["class_type"] == PRESET_LATENT and latent["inputs"].get("aspect") != CUSTOM_ASPECT
            latent["inputs"]["batch_size"] = job.count
            # a preset's size is computed by the node: the log then takes it from the sampler's report
            if not preset:
                width, height = latent["inputs"].get("width"), latent["inputs"].get("height")
        if job.filename_prefix is not None:
            for saver in self.savers:
                wf[saver]["inputs"]["filename_prefix"] = job.filename_prefix
        negative = wf[self.negative]["inputs"]["text"] if self.negative else None
        values = {"prompt": job.prompt, "negative": negative, "seed": sampler.get(seed_key),
                  "steps": sampler.get("steps"), "cfg": sampler.get("cfg"), "width": width, "height": height,
                  "count": job.count, "filename_prefix": wf[self.savers[0]]["inputs"].get("filename_prefix")}
        return wf, values


# the inputs a job sets, and the column each comes from (for errors that name the column)
COLUMN_OF = {"seed": "seed", "noise_seed": "seed", "steps": "steps", "cfg": "cfg", "width": "width",
             "height": "height", "batch_size": "count"}


def outside_limits(job: Job, workflow: dict, node_ids: list[str], object_info: dict) -> list[str]:
    """The job's values outside the server's own min/max for those inputs (e.g. the turbo sampler's 50 steps),
    read from /object_info, so such rows are named before anything is sent rather than refused one by one."""
    problems = []
    for node_id in node_ids:
        node = workflow[node_id]
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"the server has no node {node['class_type']} (node {node_id} of the workflow): "
                            f"is the pack installed there?")
            continue
        specs = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
        for name, column in COLUMN_OF.items():
            spec, value = specs.get(name), node["inputs"].get(name)
            if not (isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict)) or is_link(value):
                continue
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            low, high = spec[1].get("min"), spec[1].get("max")
            if low is not None and value < low:
                problems.append(f"{job.where}, column '{column}': {value} is below {node['class_type']}'s "
                                f"minimum {name} of {low}")
            elif high is not None and value > high:
                problems.append(f"{job.where}, column '{column}': {value} is above {node['class_type']}'s "
                                f"maximum {name} of {high}")
    return problems


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def upstream(workflow: dict, link, classes: set[str]) -> str | None:
    """The nearest node of one of these classes feeding this input (through conditioning nodes in between)."""
    if not is_link(link):
        return None
    queue, seen = deque([str(link[0])]), set()
    while queue:
        node_id = queue.popleft()
        if node_id in seen or node_id not in workflow:
            continue
        seen.add(node_id)
        node = workflow[node_id]
        if node["class_type"] in classes:
            return node_id
        queue.extend(str(v[0]) for v in node["inputs"].values() if is_link(v))
    return None
