// Builds a workflow in the page from a compact spec (nodes, widget values by name, links by
// input/output name), exactly as a user would, and returns app.graph.serialize(); optionally
// screenshots the canvas as the template thumbnail.
module.exports = async (page, { spec, thumbnail }) => {
  if (thumbnail) await page.setViewportSize({ width: 1100, height: 640 });
  const workflow = await page.evaluate(async (spec) => {
    const LG = window.LiteGraph, app = window.app;
    app.graph.clear();
    const made = {};
    for (const n of spec.nodes) {
      const node = LG.createNode(n.type);
      if (!node) throw new Error("unknown node type " + n.type);
      node.pos = n.pos;
      if (n.title) node.title = n.title;
      if (n.color) { node.color = n.color[0]; node.bgcolor = n.color[1]; }
      app.graph.add(node);
      for (const [name, v] of Object.entries(n.widgets || {})) {
        const w = name === "" ? node.widgets?.[0] : node.widgets?.find((w) => w.name === name);
        if (!w) throw new Error(`${n.type} has no widget ${JSON.stringify(name)}`);
        w.value = v;
      }
      for (const w of node.widgets || []) {   // every seed is fixed: a re-queue gives the same result
        if (w.linkedWidgets?.[0] && ["fixed", "randomize", "increment", "decrement"].includes(w.linkedWidgets[0].value)) {
          w.linkedWidgets[0].value = "fixed";
        }
      }
      if (n.properties) Object.assign(node.properties, n.properties);
      if (n.size) node.size = n.size; else node.setSize(node.computeSize());
      made[n.id] = node;
    }
    for (const n of spec.nodes) {
      for (const [input, [src, out]] of Object.entries(n.links || {})) {
        const to = made[n.id], from = made[src];
        const slot = to.inputs.findIndex((i) => i.name === input);
        const outSlot = typeof out === "number" ? out : from.outputs.findIndex((o) => o.name === out);
        if (slot < 0 || outSlot < 0) throw new Error(`cannot link ${src}.${out} -> ${n.id}.${input}`);
        if (!from.connect(outSlot, to, slot)) throw new Error(`link refused: ${src}.${out} -> ${n.id}.${input}`);
      }
    }
    const xs = app.graph.nodes.map((n) => [n.pos[0], n.pos[1], n.pos[0] + n.size[0], n.pos[1] + n.size[1] + 30]);
    const x0 = Math.min(...xs.map((b) => b[0])) - 20, y0 = Math.min(...xs.map((b) => b[1])) - 50;
    const x1 = Math.max(...xs.map((b) => b[2])) + 20, y1 = Math.max(...xs.map((b) => b[3])) + 20;
    const c = app.canvas.canvas, scale = Math.min(c.clientWidth / (x1 - x0), c.clientHeight / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(c.clientWidth / scale - (x1 - x0)) / 2 - x0, (c.clientHeight / scale - (y1 - y0)) / 2 - y0];
    app.canvas.setDirty(true, true);
    const wf = app.graph.serialize();
    wf.extra = { ...(wf.extra || {}), ds: { scale, offset: app.canvas.ds.offset } };
    return wf;
  }, spec);
  if (thumbnail) {
    await page.evaluate(async () => {
      const settings = window.app.extensionManager?.setting;
      await settings?.set?.("Comfy.Minimap.Visible", false);
      await settings?.set?.("LiteGraph.Canvas.MinFontSizeForLOD", 1);
      window.app.canvas.min_font_size_for_lod = 1;
      window.app.canvas.show_info = false;
      // only the canvas and the node widgets: hide the menus, banners and toolbars around it
      let e = document.querySelector(".graph-canvas-container");
      for (const c of e.children) if (c.tagName !== "CANVAS" && !c.classList.contains("isolate")) c.style.visibility = "hidden";
      while (e.parentElement) {
        for (const s of e.parentElement.children) if (s !== e) s.style.visibility = "hidden";
        e = e.parentElement;
      }
      window.app.canvas.setDirty(true, true);
    });
    await page.waitForTimeout(1500);
    const box = await page.locator("#graph-canvas").boundingBox();
    await page.screenshot({ path: thumbnail, type: "jpeg", quality: 72, clip: box });
  }
  return workflow;
};
