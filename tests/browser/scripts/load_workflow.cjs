// Loads a UI workflow as the template browser / drag-and-drop does; reports node types the page
// does not know, and the page's own API conversion (graphToPrompt).
module.exports = async (page, { workflow }) => {
  return await page.evaluate(async (workflow) => {
    const app = window.app, LG = window.LiteGraph;
    await app.loadGraphData(workflow, true, true, "check");
    await new Promise((r) => setTimeout(r, 500));
    const missing = [...new Set(app.graph.nodes.map((n) => n.type).filter((t) => !LG.registered_node_types[t]))];
    const flagged = app.graph.nodes.filter((n) => n.has_errors).map((n) => n.type);
    const { output } = await app.graphToPrompt();
    return { missing, flagged, prompt: output, extensions: app.extensions.map((e) => e.name) };
  }, workflow);
};
