// Builds a workflow in the page from a compact spec (graph.cjs) and returns app.graph.serialize();
// optionally screenshots the canvas as the template thumbnail.
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { spec, thumbnail }) => {
  if (thumbnail) await page.setViewportSize({ width: 1100, height: 640 });
  await page.evaluate(buildGraph, spec);
  const workflow = await page.evaluate(() => {
    const app = window.app;
    const xs = [...app.graph.nodes.map((n) => [n.pos[0], n.pos[1], n.pos[0] + n.size[0], n.pos[1] + n.size[1] + 30]),
                ...(app.graph.groups || []).map((g) => [g.pos[0], g.pos[1] + 30, g.pos[0] + g.size[0], g.pos[1] + g.size[1]])];
    const x0 = Math.min(...xs.map((b) => b[0])) - 20, y0 = Math.min(...xs.map((b) => b[1])) - 50;
    const x1 = Math.max(...xs.map((b) => b[2])) + 20, y1 = Math.max(...xs.map((b) => b[3])) + 20;
    const c = app.canvas.canvas, scale = Math.min(c.clientWidth / (x1 - x0), c.clientHeight / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(c.clientWidth / scale - (x1 - x0)) / 2 - x0, (c.clientHeight / scale - (y1 - y0)) / 2 - y0];
    app.canvas.setDirty(true, true);
    const wf = app.graph.serialize();
    wf.extra = { ...(wf.extra || {}), ds: { scale, offset: app.canvas.ds.offset } };
    return wf;
  });
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
