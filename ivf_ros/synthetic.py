"""Procedural night-street scenes: 16-bit IR and dim visible frames of moving people, cyclists and cars.

Deterministic for a given seed. Both cameras see the same (aligned) scene; each frame carries ground-truth boxes
``(class, x0, y0, x1, y1)`` in pixels with YOLO class ids as in the MSRS boxes: 0 person, 1 bicycle, 2 car.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PERSON, BICYCLE, CAR = 0, 1, 2
CLASS_NAMES = ("person", "bicycle", "car")

# Raw IR counts (16-bit microbolometer-like) per material; the scene background lies around 7000-8100.
IR_COUNTS = {
    "sky": 7000, "building": 7650, "window": 8050, "sidewalk": 7780, "road": 7920, "marking": 7860, "lamp": 8400,
    "skin": 9350, "body": 8750, "legs": 8650,
    "car": 8050, "glass": 7350, "engine": 9250, "wheel": 8900, "exhaust": 9700, "headlight": 8500, "taillight": 8300,
    "frame": 7950, "tyre": 7900,
}
# Visible reflectance (BGR, 0-255 under full light) of materials people and vehicles are made of.
VIS_ALBEDO = {
    "skin": (120, 150, 190), "legs": (45, 40, 38), "glass": (40, 35, 30), "wheel": (25, 25, 25),
    "headlight": (220, 220, 220), "taillight": (40, 40, 160), "frame": (60, 60, 70),
    "tyre": (25, 25, 25),
}


@dataclass(frozen=True)
class Frame:
    """One camera frame: ``stamp`` in seconds on the camera clock, the image and its ground-truth boxes."""

    stamp: float
    image: np.ndarray
    boxes: list[tuple[int, float, float, float, float]]


@dataclass(frozen=True)
class Agent:
    """A moving object: ``kind`` is a YOLO class id; position ``x0`` (px at t=0), ``speed`` (px/s), ground row."""

    kind: int
    x0: float
    speed: float
    ground: float
    scale: float
    phase: float
    colour: tuple[int, int, int]


class NightStreet:
    """A street at night seen from the side: buildings, two sidewalks, a two-lane road and moving agents.

    ``ir_frame(t)`` returns uint16 raw counts (sensor noise, fixed-pattern column noise and slow drift included);
    ``vis_frame(t)`` a dim, noisy BGR uint8 image with lit windows, street lamps and headlight glare.
    """

    def __init__(self, width: int = 320, height: int = 240, seed: int = 0, people: int = 4, cyclists: int = 1,
                 cars: int = 3):
        if width < 64 or height < 48:
            raise ValueError(f"synthetic scene needs at least 64x48 pixels, not {width}x{height}")
        self.width, self.height, self.seed = width, height, seed
        rng = np.random.default_rng(seed)
        self.horizon = int(0.42 * height)
        self.far_walk = (self.horizon, int(0.52 * height))
        self.road = (self.far_walk[1], int(0.86 * height))
        self.margin = 0.7 * height
        self.agents = self._make_agents(rng, people, cyclists, cars)
        self._ir_bg, self._albedo, self._emissive, self._light = self._make_background(rng)
        self._ir_columns = rng.normal(0.0, 9.0, width).astype(np.float32)  # fixed-pattern column offsets
        self._ir_gain = rng.normal(1.0, 0.0015, (height, width)).astype(np.float32)

    # -------------------------------------------------------------------------------------------- layout

    def _make_agents(self, rng, people: int, cyclists: int, cars: int) -> list[Agent]:
        h, w = self.height, self.width
        lanes = (int(0.70 * h), int(0.83 * h))
        agents = []
        for _ in range(people):
            near = rng.random() < 0.5
            ground = rng.uniform(0.90, 0.97) * h if near else rng.uniform(0.47, 0.52) * h
            speed = rng.uniform(12, 30) * rng.choice((-1, 1)) * w / 320
            agents.append(Agent(PERSON, rng.uniform(0, w), speed, ground, self._scale(ground), rng.uniform(0, 6.3),
                                tuple(int(v) for v in rng.integers(30, 80, 3))))
        for _ in range(cyclists):
            ground = rng.uniform(0.58, 0.62) * h
            agents.append(Agent(BICYCLE, rng.uniform(0, w), rng.uniform(35, 55) * rng.choice((-1, 1)) * w / 320,
                                ground, self._scale(ground), rng.uniform(0, 6.3),
                                tuple(int(v) for v in rng.integers(30, 90, 3))))
        span = w + 2 * self.margin
        for lane_index, lane in enumerate(lanes):  # cars in a lane share a speed and keep their spacing
            in_lane = len(range(lane_index, cars, 2))
            speed = (1 if lane_index == 0 else -1) * rng.uniform(60, 110) * w / 320
            start = rng.uniform(0, span)
            for k in range(in_lane):
                agents.append(Agent(CAR, start + k * span / in_lane, speed, lane, self._scale(lane), 0.0,
                                    tuple(int(v) for v in rng.integers(20, 160, 3))))
        return sorted(agents, key=lambda a: a.ground)  # far first, so nearer objects paint over them

    def _scale(self, ground: float) -> float:
        return 0.55 + 0.6 * (ground - self.horizon) / (self.height - self.horizon)

    def _make_background(self, rng):
        h, w = self.height, self.width
        ir = np.full((h, w), IR_COUNTS["sky"], np.float32)
        ir += np.linspace(0, 250, h, dtype=np.float32)[:, None]  # the sky warms towards the horizon
        albedo = np.zeros((h, w, 3), np.float32)
        albedo[:] = (40, 22, 15)  # dark blue sky
        emissive = np.zeros((h, w, 3), np.float32)
        light = np.full((h, w), 0.10, np.float32)  # ambient
        texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 0.8)

        x = 0
        while x < w:  # buildings with windows, some lit
            bw = int(rng.uniform(0.12, 0.3) * w)
            top = int(rng.uniform(0.05, 0.28) * h)
            tone = rng.uniform(70, 120)
            albedo[top:self.horizon, x:x + bw] = (tone * 0.8, tone * 0.9, tone)
            ir[top:self.horizon, x:x + bw] = IR_COUNTS["building"] + rng.normal(0, 40)
            step_x, step_y = max(6, w // 40), max(7, h // 24)
            for wy in range(top + step_y // 2, self.horizon - step_y, step_y):
                for wx in range(x + step_x // 2, x + bw - step_x, step_x):
                    lit = rng.random() < 0.35
                    ww, wh = max(2, step_x // 2), max(3, step_y // 2)
                    ir[wy:wy + wh, wx:wx + ww] = IR_COUNTS["window"] if lit else IR_COUNTS["building"] + 120
                    albedo[wy:wy + wh, wx:wx + ww] = (30, 30, 30)
                    if lit:
                        emissive[wy:wy + wh, wx:wx + ww] = (60, 150, 210) if rng.random() < 0.7 else (200, 190, 170)
            x += bw + int(rng.uniform(0, 0.05) * w)

        fw0, fw1 = self.far_walk
        r0, r1 = self.road
        albedo[fw0:fw1] = (95, 100, 105)
        ir[fw0:fw1] = IR_COUNTS["sidewalk"]
        albedo[r0:r1] = (70, 72, 75)
        ir[r0:r1] = IR_COUNTS["road"] + np.linspace(0, 60, r1 - r0, dtype=np.float32)[:, None]
        albedo[r1:] = (95, 100, 105)
        ir[r1:] = IR_COUNTS["sidewalk"] + 30
        mid = (r0 + r1) // 2
        dash = max(8, w // 16)
        for x in range(0, w, 2 * dash):  # dashed centre line
            cv2.rectangle(albedo, (x, mid - 1), (x + dash, mid), (200, 210, 215), -1)
            cv2.rectangle(ir, (x, mid - 1), (x + dash, mid), IR_COUNTS["marking"], -1)
        albedo *= 1.0 + 0.18 * texture[..., None]  # asphalt grain, facade texture
        ir += 25.0 * cv2.GaussianBlur(texture, (0, 0), 2.0)

        for lx in np.linspace(0.15, 0.85, 3) * w:  # street lamps on the far sidewalk, pools of light
            lx = int(lx + rng.uniform(-0.05, 0.05) * w)
            top = int(0.12 * h)
            cv2.line(albedo, (lx, top), (lx, fw1), (50, 50, 50), max(1, w // 200))
            cv2.circle(emissive, (lx, top), max(2, w // 100), (170, 230, 255), -1)
            cv2.circle(ir, (lx, top), max(2, w // 100), IR_COUNTS["lamp"], -1)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            light += 0.55 * np.exp(-(((xx - lx) / (0.12 * w)) ** 2 + ((yy - fw1) / (0.25 * h)) ** 2))
        return ir, albedo, emissive, light

    # -------------------------------------------------------------------------------------------- motion

    def _position(self, agent: Agent, t: float) -> float:
        span = self.width + 2 * self.margin
        return (agent.x0 + agent.speed * t + self.margin) % span - self.margin

    def _parts(self, agent: Agent, t: float):
        """Shapes of an agent at time t: [(material, kind, geometry)] and its boxes [(class, x0, y0, x1, y1)]."""
        h = self.height
        x, g, s = self._position(agent, t), agent.ground, agent.scale
        facing = 1 if agent.speed >= 0 else -1
        if agent.kind == PERSON:
            return self._person(x, g, 0.27 * h * s, t * abs(agent.speed) / (0.1 * h * s) + agent.phase)
        if agent.kind == BICYCLE:
            return self._bicycle(x, g, 0.22 * h * s, facing, t, agent.phase)
        return self._car(x, g, 0.55 * h * s, facing)

    @staticmethod
    def _person(x: float, g: float, height: float, gait: float):
        head = height * 0.12
        swing = 0.35 * math.sin(gait)
        hip = g - 0.47 * height
        leg = 0.47 * height
        shoulder = g - 0.82 * height
        parts = [
            ("legs", "line", (x, hip, x + leg * math.sin(swing), g, 0.09 * height)),
            ("legs", "line", (x, hip, x - leg * math.sin(swing), g, 0.09 * height)),
            ("body", "ellipse", (x, (hip + shoulder) / 2, 0.13 * height, 0.22 * height)),
            ("body", "line", (x, shoulder + 4, x + 0.25 * height * math.sin(-swing), hip, 0.06 * height)),
            ("skin", "circle", (x, shoulder - head * 0.9, head * 0.75)),
        ]
        half_w = max(0.16 * height, 0.5 * leg * abs(math.sin(swing)) + 0.05 * height)
        return parts, [(PERSON, x - half_w, g - height, x + half_w, g)]

    def _bicycle(self, x: float, g: float, length: float, facing: int, t: float, phase: float):
        r = 0.3 * length
        rear, front = x - facing * 0.33 * length, x + facing * 0.33 * length
        cy = g - r
        seat, bar = (x - facing * 0.1 * length, cy - 0.9 * r), (front - facing * 0.1 * length, cy - 1.1 * r)
        parts = [
            ("tyre", "ring", (rear, cy, r, max(1.0, 0.12 * r))),
            ("tyre", "ring", (front, cy, r, max(1.0, 0.12 * r))),
            ("frame", "line", (rear, cy, seat[0], seat[1], 0.06 * r)),
            ("frame", "line", (rear, cy, x, cy, 0.06 * r)),
            ("frame", "line", (x, cy, bar[0], bar[1], 0.06 * r)),
            ("frame", "line", (seat[0], seat[1], bar[0], bar[1], 0.06 * r)),
            ("frame", "line", (front, cy, bar[0], bar[1], 0.06 * r)),
        ]
        rider_h = 0.95 * length
        pedal = 2 * math.pi * 1.2 * t + phase
        hip = seat[1]
        knee = (seat[0] + facing * 0.3 * r, hip + 0.2 * r * math.sin(pedal))
        rider = [
            ("legs", "line", (seat[0], hip, knee[0], knee[1], 0.1 * r)),
            ("legs", "line", (knee[0], knee[1], x + 0.3 * r * math.cos(pedal), cy + 0.3 * r * math.sin(pedal),
                              0.09 * r)),
            ("body", "line", (seat[0], hip, seat[0] + facing * 0.25 * rider_h, hip - 0.45 * rider_h, 0.3 * r)),
            ("body", "line", (seat[0] + facing * 0.25 * rider_h, hip - 0.42 * rider_h, bar[0], bar[1], 0.1 * r)),
            ("skin", "circle", (seat[0] + facing * 0.3 * rider_h, hip - 0.55 * rider_h, 0.12 * rider_h)),
        ]
        bike_box = (BICYCLE, min(rear, front) - r, g - 2.1 * r, max(rear, front) + r, g)
        head_top = hip - 0.67 * rider_h
        xs = [seat[0] - 0.1 * r, seat[0] + facing * 0.42 * rider_h, bar[0], knee[0]]
        rider_box = (PERSON, min(xs), head_top, max(xs), cy + 0.4 * r)
        return parts + rider, [bike_box, rider_box]

    @staticmethod
    def _car(x: float, g: float, length: float, facing: int):
        height = 0.36 * length
        r = 0.1 * length
        x0, x1 = x - length / 2, x + length / 2
        body_top, cabin_top = g - 0.62 * height, g - height
        front = x1 if facing > 0 else x0
        back = x0 if facing > 0 else x1
        cab0, cab1 = x - 0.28 * length - facing * 0.05 * length, x + 0.22 * length - facing * 0.05 * length
        parts = [
            ("car", "rect", (x0, body_top, x1, g - 0.6 * r)),
            ("car", "poly", ((cab0 - 0.05 * length, body_top), (cab0 + 0.05 * length, cabin_top),
                             (cab1 - 0.05 * length, cabin_top), (cab1 + 0.05 * length, body_top))),
            ("glass", "poly", ((cab0 + 0.02 * length, body_top - 0.05 * height),
                               (cab0 + 0.07 * length, cabin_top + 0.08 * height),
                               (cab1 - 0.07 * length, cabin_top + 0.08 * height),
                               (cab1 - 0.02 * length, body_top - 0.05 * height))),
            ("engine", "rect", (min(front, front - facing * 0.25 * length), body_top + 0.05 * height,
                                max(front, front - facing * 0.25 * length), g - 1.2 * r)),
            ("wheel", "circle", (x - 0.3 * length, g - r, r)),
            ("wheel", "circle", (x + 0.3 * length, g - r, r)),
            ("exhaust", "circle", (back + facing * 0.03 * length, g - 0.8 * r, 0.25 * r)),
            ("headlight", "circle", (front - facing * 0.02 * length, body_top + 0.12 * height, 0.07 * height)),
            ("taillight", "circle", (back + facing * 0.02 * length, body_top + 0.12 * height, 0.06 * height)),
        ]
        return parts, [(CAR, x0, cabin_top, x1, g)]

    # -------------------------------------------------------------------------------------------- drawing

    @staticmethod
    def _draw(canvas: np.ndarray, kind: str, geom, value) -> None:
        pt = lambda px, py: (int(round(px * 4)), int(round(py * 4)))  # noqa: E731 - 2 bits of sub-pixel precision
        if kind == "line":
            x0, y0, x1, y1, thick = geom
            cv2.line(canvas, pt(x0, y0), pt(x1, y1), value, max(1, int(round(thick))), cv2.LINE_AA, 2)
        elif kind == "circle":
            cx, cy, rad = geom
            cv2.circle(canvas, pt(cx, cy), max(1, int(round(rad * 4))), value, -1, cv2.LINE_AA, 2)
        elif kind == "ring":
            cx, cy, rad, thick = geom
            cv2.circle(canvas, pt(cx, cy), max(1, int(round(rad * 4))), value, max(1, int(round(thick))),
                       cv2.LINE_AA, 2)
        elif kind == "ellipse":
            cx, cy, ax, ay = geom
            cv2.ellipse(canvas, pt(cx, cy), (max(1, int(ax * 4)), max(1, int(ay * 4))), 0, 0, 360, value, -1,
                        cv2.LINE_AA, 2)
        elif kind == "rect":
            x0, y0, x1, y1 = geom
            cv2.rectangle(canvas, pt(x0, y0), pt(x1, y1), value, -1, cv2.LINE_AA, 2)
        else:  # poly
            cv2.fillPoly(canvas, [np.array([pt(*p) for p in geom], np.int32)], value, cv2.LINE_AA, 2)

    def boxes(self, t: float) -> list[tuple[int, float, float, float, float]]:
        """Ground-truth boxes at time t, clipped to the image; objects less than 40 % inside are left out."""
        out = []
        for agent in self.agents:
            for c, x0, y0, x1, y1 in self._parts(agent, t)[1]:
                cx0, cy0 = max(0.0, x0), max(0.0, y0)
                cx1, cy1 = min(float(self.width), x1), min(float(self.height), y1)
                if cx1 - cx0 >= 2 and cy1 - cy0 >= 2 and (cx1 - cx0) * (cy1 - cy0) >= 0.4 * (x1 - x0) * (y1 - y0):
                    out.append((c, float(cx0), float(cy0), float(cx1), float(cy1)))
        return out

    def ir_frame(self, t: float, index: int = 0) -> np.ndarray:
        """Raw uint16 IR at time t; ``index`` seeds the temporal noise."""
        ir = self._ir_bg.copy()
        for agent in self.agents:
            for material, kind, geom in self._parts(agent, t)[0]:
                self._draw(ir, kind, geom, float(IR_COUNTS[material]))
        ir = cv2.GaussianBlur(ir, (0, 0), 0.9)  # optics
        rng = np.random.default_rng((self.seed, 0, index))
        ir = ir * self._ir_gain + self._ir_columns + 20.0 * math.sin(0.4 * t)  # fixed pattern and slow drift
        ir += rng.normal(0.0, 14.0, ir.shape).astype(np.float32)
        return np.clip(ir + 0.5, 0, 65535).astype(np.uint16)

    def vis_frame(self, t: float, index: int = 0) -> np.ndarray:
        """Dim, noisy BGR uint8 at time t; ``index`` seeds the temporal noise."""
        albedo, emissive, light = self._albedo.copy(), self._emissive.copy(), self._light.copy()
        for agent in self.agents:
            parts, _ = self._parts(agent, t)
            for material, kind, geom in parts:
                if material in ("body", "car"):
                    colour = agent.colour
                elif material in ("engine", "exhaust"):
                    continue
                else:
                    colour = VIS_ALBEDO[material]
                self._draw(albedo, kind, geom, tuple(float(c) for c in colour))
                if material == "headlight":
                    self._draw(emissive, kind, geom, (900.0, 900.0, 900.0))
                    cx, cy, rad = geom
                    facing = 1 if agent.speed >= 0 else -1
                    beam = np.array([(cx, cy), (cx + facing * 14 * rad, cy + 3 * rad),
                                     (cx + facing * 14 * rad, agent.ground + 2 * rad)], np.float32)
                    cv2.fillPoly(light, [np.round(beam).astype(np.int32)], 0.5)
                elif material == "taillight":
                    self._draw(emissive, kind, geom, (20.0, 20.0, 220.0))
        img = albedo * cv2.GaussianBlur(light, (0, 0), 3.0)[..., None] + emissive
        glare = cv2.GaussianBlur(emissive, (0, 0), 0.02 * self.width) + cv2.GaussianBlur(emissive, (0, 0), 2.0)
        img += 0.8 * glare
        rng = np.random.default_rng((self.seed, 1, index))
        noise = rng.normal(0.0, 1.0, img.shape).astype(np.float32) * (2.5 + 0.35 * np.sqrt(np.maximum(img, 0)))
        return np.clip(img + noise + 0.5, 0, 255).astype(np.uint8)


def render_sequence(scene: NightStreet, duration: float, ir_rate: float = 30.0, vis_rate: float = 25.0,
                    vis_offset: float = 0.004, jitter: float = 0.0005) -> tuple[list[Frame], list[Frame]]:
    """Frames of both cameras over ``duration`` seconds at their own rates.

    The visible camera starts ``vis_offset`` seconds after the IR one; each stamp has Gaussian ``jitter`` (s).
    """
    if duration <= 0 or ir_rate <= 0 or vis_rate <= 0:
        raise ValueError("duration and rates must be positive")
    rng = np.random.default_rng((scene.seed, 2))

    def stamps(rate: float, offset: float) -> list[float]:
        n = int(math.floor(duration * rate + 1e-9))
        return [max(0.0, offset + i / rate + rng.normal(0.0, jitter)) if jitter else offset + i / rate
                for i in range(n)]

    ir = [Frame(t, scene.ir_frame(t, i), scene.boxes(t)) for i, t in enumerate(stamps(ir_rate, 0.0))]
    vis = [Frame(t, scene.vis_frame(t, i), scene.boxes(t)) for i, t in enumerate(stamps(vis_rate, vis_offset))]
    return ir, vis


def yolo_lines(boxes, width: int, height: int) -> str:
    """Boxes in pixels -> YOLO text (``class cx cy w h`` normalised), the format ``data.read_yolo_boxes`` reads."""
    lines = []
    for c, x0, y0, x1, y1 in boxes:
        lines.append(f"{c} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                     f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")
