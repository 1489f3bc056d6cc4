"""Synthetic CLEVRER-like videos written in the competition's exact raw layout.

Each video is a small rigid-body simulation (pybullet, ``DIRECT`` mode) rendered with
pybullet's software renderer (``ER_TINY_RENDERER``): 3 to 8 objects slide on a grey floor,
some start outside the view and drive in, some are aimed at each other and collide, and
floor friction slows them all down. The segmentation buffer of the same render call gives
the per-pixel class mask, so frames and masks always agree pixel for pixel.

Class ids (``mask.npy`` values, 0..48)::

    class_id = 1 + shape * 16 + material * 8 + colour
    shape:    0 cube, 1 sphere, 2 cylinder
    material: 0 metal, 1 rubber
    colour:   0 gray, 1 red, 2 blue, 3 green, 4 brown, 5 purple, 6 cyan, 7 yellow
    0 = background (the floor and anything that is not an object)

e.g. 1 = "gray metal cube", 10 = "red rubber cube", 17 = "gray metal sphere",
48 = "yellow rubber cylinder". ``class_name(class_id)`` spells it out.

Metal and rubber look different: every frame is rendered once with matte lighting, and
when a metal object is in view, a second time with a strong specular term; metal pixels
(known from the segmentation buffer) come from the second render.

Determinism: a video's content depends only on ``(seed, video_id)``; ``size`` only sets
the resolution it is rendered at (the camera keeps the same field of view). Every video is
simulated in a fresh pybullet client, so neither the order in which videos are made, nor
how many are made, nor the number of workers changes a single byte (for the same pybullet,
numpy and Pillow builds: another physics or PNG-encoder version may change bytes).

The dataset on disk (layout, resume, CLI) is written by ``hpcvp.data.synthetic_set``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from hpcvp.data.layout import (
    HEIGHT,
    NUM_CLASSES,
    NUM_FRAMES,
    WIDTH,
)

SHAPES = ("cube", "sphere", "cylinder")
MATERIALS = ("metal", "rubber")
COLOURS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
# CLEVR's palette (sRGB 0..255).
COLOUR_RGB = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
assert 1 + len(SHAPES) * len(MATERIALS) * len(COLOURS) == NUM_CLASSES

# --- simulation -------------------------------------------------------------------------
TIME_STEP = 1.0 / 240.0
STEPS_PER_FRAME = 20  # 12 frames per simulated second; 22 frames = 1.83 s
FRAME_SECONDS = TIME_STEP * STEPS_PER_FRAME
GRAVITY = 9.81
OBJECT_HALF_SIZE = 0.55  # cube half edge, sphere radius, cylinder radius and half height
FLOOR_FRICTION = 1.0
# Bullet multiplies the two bodies' coefficients; with the floor at 1.0 these are the
# sliding friction coefficients, i.e. a slide decelerates at friction * g.
OBJECT_FRICTION = {"metal": 0.06, "rubber": 0.09}
OBJECT_MASS = {"metal": 2.0, "rubber": 1.0}
OBJECT_RESTITUTION = 0.7  # object-object bounces; the floor has 0 so nothing hops
SPHERE_ROLLING_FRICTION = 0.004
MIN_OBJECTS, MAX_OBJECTS = 3, 8

# --- camera and light ------------------------------------------------------------------
CAMERA_EYE = (0.0, -11.5, 8.0)
CAMERA_TARGET = (0.0, 0.6, 0.0)
CAMERA_FOV_DEG = 30.0  # vertical; the horizontal field follows the frame's aspect (3:2 at 160x240)
LIGHT_DIRECTION = (-2.0, -3.0, 6.0)
FLOOR_RGB = (0.62, 0.62, 0.60)
MATTE_LIGHT = dict(lightAmbientCoeff=0.55, lightDiffuseCoeff=0.45, lightSpecularCoeff=0.0)
METAL_LIGHT = dict(lightAmbientCoeff=0.35, lightDiffuseCoeff=0.45, lightSpecularCoeff=1.6)


def class_id(shape: str, material: str, colour: str) -> int:
    """The class id of an object, e.g. ``class_id("cube", "metal", "red") == 2``."""
    return 1 + SHAPES.index(shape) * 16 + MATERIALS.index(material) * 8 + COLOURS.index(colour)


def class_attributes(cls: int) -> tuple[str, str, str]:
    """``(shape, material, colour)`` of class id 1..48."""
    if not 1 <= int(cls) < NUM_CLASSES:
        raise ValueError(f"class id {cls} is not an object class (1..{NUM_CLASSES - 1})")
    index = int(cls) - 1
    return SHAPES[index // 16], MATERIALS[(index // 8) % 2], COLOURS[index % 8]


def class_name(cls: int) -> str:
    """Human name of a class id: 0 -> "background", 2 -> "red metal cube"."""
    if int(cls) == 0:
        return "background"
    shape, material, colour = class_attributes(cls)
    return f"{colour} {material} {shape}"


# --- scene sampling ---------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    cls: int
    position: tuple[float, float]
    yaw: float
    velocity: tuple[float, float]

    @property
    def shape(self) -> str:
        return class_attributes(self.cls)[0]

    @property
    def material(self) -> str:
        return class_attributes(self.cls)[1]


def _matrices(width: int, height: int) -> tuple[list[float], list[float]]:
    import pybullet as p

    view = p.computeViewMatrix(CAMERA_EYE, CAMERA_TARGET, (0.0, 0.0, 1.0))
    proj = p.computeProjectionMatrixFOV(CAMERA_FOV_DEG, width / height, 0.1, 60.0)
    return view, proj


@functools.lru_cache(maxsize=1)
def _world_to_clip() -> np.ndarray:
    view, proj = _matrices(WIDTH, HEIGHT)
    # pybullet matrices are column-major.
    return np.asarray(proj, dtype=np.float64).reshape(4, 4).T @ np.asarray(view, dtype=np.float64).reshape(4, 4).T


def _project(xy: np.ndarray, z: float = OBJECT_HALF_SIZE) -> np.ndarray:
    """Normalised device coordinates (x, y) of floor points ``xy`` (N,2) seen by the camera."""
    transform = _world_to_clip()
    points = np.concatenate([xy, np.full((len(xy), 1), z), np.ones((len(xy), 1))], axis=1)
    clip = points @ transform.T
    return clip[:, :2] / clip[:, 3:4]


def _in_view(xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Whether object centres at ``xy`` (N,2) are within the frame shrunk by ``margin`` (NDC)."""
    ndc = _project(np.atleast_2d(np.asarray(xy, dtype=np.float64)))
    return np.all(np.abs(ndc) <= 1.0 - margin, axis=1)


def _slide_distance(speed: float, seconds: float, material: str) -> float:
    """How far an object launched at ``speed`` slides in ``seconds`` under floor friction."""
    decel = OBJECT_FRICTION[material] * FLOOR_FRICTION * GRAVITY
    stop_time = speed / decel
    t = min(seconds, stop_time)
    return speed * t - 0.5 * decel * t * t


def _launch_speed(distance: float, seconds: float, material: str) -> float:
    """Speed needed to slide ``distance`` in ``seconds`` (before friction stops the object)."""
    decel = OBJECT_FRICTION[material] * FLOOR_FRICTION * GRAVITY
    speed = distance / seconds + 0.5 * decel * seconds
    # Friction stops the object after speed/decel; if that is earlier, launch faster.
    return max(speed, math.sqrt(2.0 * decel * distance) * 1.02)


def _floor_point(ndc: tuple[float, float], z: float = OBJECT_HALF_SIZE) -> np.ndarray:
    """The point at height ``z`` seen at normalised device coordinates ``ndc``."""
    m = _world_to_clip()
    u, v = ndc
    # u = (m0 . X) / (m3 . X) and v likewise, with X = (x, y, z, 1): two linear equations in x, y.
    rows = np.stack([m[0] - u * m[3], m[1] - v * m[3]])
    return np.linalg.solve(rows[:, :2], -(rows[:, 2] * z + rows[:, 3]))


def _random_point_in_view(rng: np.random.Generator, margin: float) -> np.ndarray:
    """A floor point uniformly distributed over the image (not over the floor, where the far
    half of the view would get most points)."""
    return _floor_point(rng.uniform(-1.0 + margin, 1.0 - margin, size=2))


def _exit_distance(start: np.ndarray, direction: np.ndarray) -> float:
    """Distance along ``direction`` from a point in view to where it leaves the view."""
    step = 0.1
    distance = 0.0
    while _in_view(start + direction * (distance + step), margin=-0.15)[0] and distance < 30.0:
        distance += step
    return distance + step


def sample_scene(seed: int, video_id: int) -> list[SceneObject]:
    """The objects of video ``video_id`` under ``seed``: classes, starts and launch velocities.

    Roles: resting objects, objects already moving in view, objects driving in from outside
    the view, and (in most videos) a pair aimed to meet at the same point at the same time.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(video_id)]))
    num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=num_objects, replace=False)
    min_gap = 2.0 * OBJECT_HALF_SIZE * math.sqrt(2.0) + 0.25  # cubes at any yaw never overlap

    for _attempt in range(200):
        objects: list[SceneObject] = []
        starts: list[np.ndarray] = []
        index = 0
        if num_objects >= 2 and rng.random() < 0.75:
            meet = _random_point_in_view(rng, margin=0.35)
            seconds = rng.uniform(0.4, 1.1)
            first = rng.uniform(0.0, 2.0 * math.pi)
            second = first + math.pi + rng.uniform(-1.2, 1.2)  # roughly head-on
            for angle in (first, second):
                material = class_attributes(classes[index])[1]
                direction = np.array([math.cos(angle), math.sin(angle)])
                speed = rng.uniform(1.5, 3.2)
                travel = _slide_distance(speed, seconds, material)
                start = meet - direction * travel
                objects.append(
                    SceneObject(int(classes[index]), tuple(start), rng.uniform(0, math.pi), tuple(direction * speed))
                )
                starts.append(start)
                index += 1
        while index < num_objects:
            material = class_attributes(classes[index])[1]
            role = rng.choice(["rest", "moving", "entering"], p=[0.15, 0.5, 0.35])
            if role == "entering":
                target = _random_point_in_view(rng, margin=0.3)
                angle = rng.uniform(0.0, 2.0 * math.pi)
                direction = np.array([math.cos(angle), math.sin(angle)])
                outside = _exit_distance(target, -direction) + rng.uniform(0.3, 1.5)
                start = target - direction * outside
                speed = min(_launch_speed(outside, rng.uniform(0.5, 1.4), material), 7.0)
                velocity = direction * speed
            else:
                start = _random_point_in_view(rng, margin=0.1)
                angle = rng.uniform(0.0, 2.0 * math.pi)
                speed = 0.0 if role == "rest" else rng.uniform(1.2, 3.5)
                velocity = np.array([math.cos(angle), math.sin(angle)]) * speed
            objects.append(SceneObject(int(classes[index]), tuple(start), rng.uniform(0, math.pi), tuple(velocity)))
            starts.append(start)
            index += 1
        points = np.stack(starts)
        gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(len(points)) * 1e9
        if gaps.min() >= min_gap:
            return [
                SceneObject(
                    o.cls,
                    (float(o.position[0]), float(o.position[1])),
                    float(o.yaw),
                    (float(o.velocity[0]), float(o.velocity[1])),
                )
                for o in objects
            ]
    raise RuntimeError(f"could not place {num_objects} objects without overlap (seed {seed}, video {video_id})")


# --- simulation and rendering -----------------------------------------------------------
@contextlib.contextmanager
def _bullet_client() -> Iterator[int]:
    import pybullet as p

    client = p.connect(p.DIRECT)
    try:
        yield client
    finally:
        p.disconnect(client)


def _build_world(client: int, objects: Sequence[SceneObject]) -> dict[int, int]:
    """Create floor and objects; returns body id -> class id for the objects."""
    import pybullet as p

    p.setGravity(0.0, 0.0, -GRAVITY, physicsClientId=client)
    p.setTimeStep(TIME_STEP, physicsClientId=client)
    floor_half = (40.0, 40.0, 0.1)
    # The renderer has no near-plane clipping: floor triangles reaching behind the camera
    # rasterise as stray wedges, so the visible floor stops in front of it.
    visual_y = (CAMERA_EYE[1] + 2.0, 40.0)
    visual_half = (floor_half[0], (visual_y[1] - visual_y[0]) / 2.0, floor_half[2])
    floor = p.createMultiBody(
        0.0,
        p.createCollisionShape(p.GEOM_BOX, halfExtents=floor_half, physicsClientId=client),
        p.createVisualShape(
            p.GEOM_BOX,
            halfExtents=visual_half,
            rgbaColor=(*FLOOR_RGB, 1.0),
            visualFramePosition=(0.0, (visual_y[0] + visual_y[1]) / 2.0, 0.0),
            physicsClientId=client,
        ),
        (0.0, 0.0, -floor_half[2]),
        physicsClientId=client,
    )
    p.changeDynamics(
        floor,
        -1,
        lateralFriction=FLOOR_FRICTION,
        restitution=0.0,
        rollingFriction=1.0,
        spinningFriction=1.0,
        physicsClientId=client,
    )

    body_classes: dict[int, int] = {}
    s = OBJECT_HALF_SIZE
    for obj in objects:
        shape, material, colour = class_attributes(obj.cls)
        rgba = (*(c / 255.0 for c in COLOUR_RGB[colour]), 1.0)
        if shape == "cube":
            collision = p.createCollisionShape(p.GEOM_BOX, halfExtents=(s, s, s), physicsClientId=client)
            visual = p.createVisualShape(p.GEOM_BOX, halfExtents=(s, s, s), rgbaColor=rgba, physicsClientId=client)
        elif shape == "sphere":
            collision = p.createCollisionShape(p.GEOM_SPHERE, radius=s, physicsClientId=client)
            visual = p.createVisualShape(p.GEOM_SPHERE, radius=s, rgbaColor=rgba, physicsClientId=client)
        else:
            collision = p.createCollisionShape(p.GEOM_CYLINDER, radius=s, height=2 * s, physicsClientId=client)
            visual = p.createVisualShape(
                p.GEOM_CYLINDER, radius=s, length=2 * s, rgbaColor=rgba, physicsClientId=client
            )
        orientation = p.getQuaternionFromEuler((0.0, 0.0, obj.yaw))
        body = p.createMultiBody(
            OBJECT_MASS[material],
            collision,
            visual,
            (obj.position[0], obj.position[1], s),
            orientation,
            physicsClientId=client,
        )
        p.changeDynamics(
            body,
            -1,
            lateralFriction=OBJECT_FRICTION[material],
            restitution=OBJECT_RESTITUTION,
            rollingFriction=SPHERE_ROLLING_FRICTION if shape == "sphere" else 0.0,
            spinningFriction=0.02,
            linearDamping=0.0,
            angularDamping=0.05,
            physicsClientId=client,
        )
        vx, vy = obj.velocity
        # A sphere launched without spin would skid first; start it rolling instead.
        spin = (-vy / s, vx / s, 0.0) if shape == "sphere" else (0.0, 0.0, 0.0)
        p.resetBaseVelocity(body, (vx, vy, 0.0), spin, physicsClientId=client)
        body_classes[body] = obj.cls
    return body_classes


def _render(
    client: int, width: int, height: int, light: dict, segmentation: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(rgb (H,W,3) uint8, segmentation body ids (H,W) | None, depth buffer in [0, 1] (H,W) | None)."""
    import pybullet as p

    view, proj = _matrices(width, height)
    flags = 0 if segmentation else p.ER_NO_SEGMENTATION_MASK
    _, _, rgba, depth, seg = p.getCameraImage(
        width,
        height,
        view,
        proj,
        lightDirection=LIGHT_DIRECTION,
        lightColor=(1.0, 1.0, 1.0),
        lightDistance=12.0,
        shadow=0,
        renderer=p.ER_TINY_RENDERER,
        flags=flags,
        physicsClientId=client,
        **light,
    )
    rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3]
    if not segmentation:
        return rgb, None, None
    seg = np.asarray(seg, dtype=np.int64).reshape(height, width)
    return rgb, seg, np.asarray(depth, dtype=np.float64).reshape(height, width)


def _poses(client: int, bodies) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """body -> (position (3,), rotation matrix (3,3)) now."""
    import pybullet as p

    poses = {}
    for body in bodies:
        position, quaternion = p.getBasePositionAndOrientation(body, physicsClientId=client)
        rotation = np.asarray(p.getMatrixFromQuaternion(quaternion), dtype=np.float64).reshape(3, 3)
        poses[body] = (np.asarray(position, dtype=np.float64), rotation)
    return poses


def rigid_flow(
    seg: np.ndarray,
    depth: np.ndarray,
    poses_now: dict[int, tuple[np.ndarray, np.ndarray]],
    poses_next: dict[int, tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """Ground-truth optical flow (2, H, W) float32 (dx, dy in pixels) of one frame to the next.

    Each pixel showing object ``b`` (``seg`` body ids, ``depth`` the renderer's [0, 1] depth
    buffer) is unprojected to its 3D point, carried by the body's rigid motion from ``poses_now``
    to ``poses_next`` (point in body frame = R^T (X - c), then R' x + c'), and projected again:
    flow = where the surface point is seen in the next frame minus where it is seen now (defined
    also where it becomes hidden in the next frame). Floor and empty pixels get zero flow
    (the camera is static). Pixel (row i, col j) is taken at its centre (j + 0.5, i + 0.5).
    """
    height, width = seg.shape
    view, proj = _matrices(width, height)
    world_to_clip = (
        np.asarray(proj, dtype=np.float64).reshape(4, 4).T @ np.asarray(view, dtype=np.float64).reshape(4, 4).T
    )
    flow = np.zeros((2, height, width), dtype=np.float32)
    moving = np.isin(seg, list(poses_now))
    if not moving.any():
        return flow
    rows, cols = np.nonzero(moving)
    ndc = np.stack(
        [
            2.0 * (cols + 0.5) / width - 1.0,
            1.0 - 2.0 * (rows + 0.5) / height,
            2.0 * depth[rows, cols] - 1.0,
            np.ones(len(rows)),
        ],
        axis=1,
    )
    world = ndc @ np.linalg.inv(world_to_clip).T
    world = world[:, :3] / world[:, 3:4]
    moved = np.empty_like(world)
    bodies = seg[rows, cols]
    for body in np.unique(bodies):
        sel = bodies == body
        (c0, r0), (c1, r1) = poses_now[int(body)], poses_next[int(body)]
        moved[sel] = ((world[sel] - c0) @ r0) @ r1.T + c1
    clip = np.concatenate([moved, np.ones((len(moved), 1))], axis=1) @ world_to_clip.T
    x_ndc, y_ndc = clip[:, 0] / clip[:, 3], clip[:, 1] / clip[:, 3]
    flow[0, rows, cols] = (x_ndc + 1.0) / 2.0 * width - 0.5 - cols
    flow[1, rows, cols] = (1.0 - y_ndc) / 2.0 * height - 0.5 - rows
    return flow


def render_video(
    video_id: int,
    seed: int,
    size: tuple[int, int] = (HEIGHT, WIDTH),
    num_frames: int = NUM_FRAMES,
    with_flow: bool = False,
):
    """Simulate and render video ``video_id`` of the dataset made with ``seed``.

    Returns ``frames`` uint8 (T,H,W,3) and ``masks`` uint8 (T,H,W) of class ids 0..48, with
    ``T = num_frames`` (22 by default; a shorter render equals the start of a longer one), and with
    ``with_flow`` also ``flow`` float32 (T-1,2,H,W): the ground-truth flow of frame t to t+1.
    """
    return render_scene(sample_scene(seed, video_id), size, num_frames, with_flow=with_flow)


def render_scene(
    objects: Sequence[SceneObject],
    size: tuple[int, int] = (HEIGHT, WIDTH),
    num_frames: int = NUM_FRAMES,
    with_flow: bool = False,
):
    """Simulate ``objects`` from their launch state and render ``num_frames`` frames and masks
    (and, ``with_flow``, the ground-truth flow (T-1,2,H,W) of each frame to the next: ``rigid_flow``)."""
    import pybullet as p

    height, width = (int(v) for v in size)
    if height < 8 or width < 8:
        raise ValueError(f"frame size {height}x{width} is too small (need at least 8x8)")
    if not 1 <= num_frames <= NUM_FRAMES:
        raise ValueError(f"num_frames must be in 1..{NUM_FRAMES}, got {num_frames}")
    if not objects:
        raise ValueError("a scene needs at least one object")
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    masks = np.empty((num_frames, height, width), dtype=np.uint8)
    flow = np.zeros((max(num_frames - 1, 0), 2, height, width), dtype=np.float32) if with_flow else None
    with _bullet_client() as client:
        body_classes = _build_world(client, objects)
        # Segmentation ids: -1 = nothing, floor = 0, objects as created; map to class ids.
        lookup = np.zeros(max(body_classes) + 2, dtype=np.uint8)
        metal = np.zeros(max(body_classes) + 2, dtype=bool)
        for body, cls in body_classes.items():
            lookup[body + 1] = cls
            metal[body + 1] = class_attributes(cls)[1] == "metal"
        previous = None  # (seg, depth, poses) of the frame before, for the flow
        for t in range(num_frames):
            if t:
                for _ in range(STEPS_PER_FRAME):
                    p.stepSimulation(physicsClientId=client)
            rgb, seg, depth = _render(client, width, height, MATTE_LIGHT, segmentation=True)
            if flow is not None:
                poses = _poses(client, body_classes)
                if previous is not None:
                    flow[t - 1] = rigid_flow(previous[0], previous[1], previous[2], poses)
                previous = (seg, depth, poses)
            seg_index = seg + 1
            masks[t] = lookup[seg_index]
            metal_pixels = metal[seg_index]
            if metal_pixels.any():
                shiny, _, _ = _render(client, width, height, METAL_LIGHT, segmentation=False)
                rgb = np.where(metal_pixels[..., None], shiny, rgb)
            frames[t] = rgb
    if flow is not None:
        return frames, masks, flow
    return frames, masks


# --- dataset on disk --------------------------------------------------------------------
